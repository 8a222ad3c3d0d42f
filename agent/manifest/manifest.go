// Package manifest reads deploy manifests: TOML files naming a namespace
// and its services. Every problem is reported with the file, the line and
// the key at fault, and all problems are reported at once.
package manifest

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/drover-sh/drover/fsm"
)

// Manifest is a namespace and its services, sorted by name.
type Manifest struct {
	Namespace string
	Services  []fsm.ServiceSpec
	// Move names the services whose volumes are marked `move = true`:
	// placed on another machine than the one they run on, they migrate
	// there with their volumes instead of being refused.
	Move map[string]bool
}

// Error is one problem in a manifest.
type Error struct {
	File string
	Line int // 0 when unknown
	Key  string
	Msg  string
}

func (e *Error) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc += ":" + strconv.Itoa(e.Line)
	}
	if e.Key != "" {
		return loc + ": " + e.Key + ": " + e.Msg
	}
	return loc + ": " + e.Msg
}

// Errors is every problem found, in file order.
type Errors []*Error

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

type rawManifest struct {
	Namespace string                `toml:"namespace"`
	Services  map[string]rawService `toml:"services"`
}

type rawService struct {
	Image     string            `toml:"image"`
	Command   []string          `toml:"command"`
	Env       map[string]string `toml:"env"`
	Memory    any               `toml:"memory"`
	Machine   string            `toml:"machine"`
	Ports     []rawPort         `toml:"ports"`
	Volumes   []rawVolume       `toml:"volumes"`
	Binds     []rawBind         `toml:"binds"`
	Readiness *rawReadiness     `toml:"readiness"`
	// StopSignal and StopTimeout: how the container is asked to stop.
	StopSignal  string `toml:"stop_signal"`
	StopTimeout string `toml:"stop_timeout"`
	// Flush: run in the container before a move's last warm round.
	Flush      []string          `toml:"flush"`
	Entrypoint []string          `toml:"entrypoint"`
	User       string            `toml:"user"`
	WorkingDir string            `toml:"working_dir"`
	Labels     map[string]string `toml:"labels"`
	ReadOnly   bool              `toml:"read_only"`
	Tmpfs      []rawTmpfs        `toml:"tmpfs"`
	Restart    string            `toml:"restart"`
	RestartMax *int              `toml:"restart_max"`
	Health     *rawReadiness     `toml:"health"`
	CPUs       any               `toml:"cpus"`
	// Secrets: names, or tables with name, path, uid, gid and mode.
	Secrets []any       `toml:"secrets"`
	Standby *rawStandby `toml:"standby"`
}

type rawStandby struct {
	Machine  string `toml:"machine"`
	Interval string `toml:"interval"`
	Failover string `toml:"failover"`
	After    string `toml:"after"`
}

type rawTmpfs struct {
	Path string `toml:"path"`
	Size any    `toml:"size"`
}

type rawPort struct {
	Port     int    `toml:"port"`
	Target   int    `toml:"target"`
	Protocol string `toml:"protocol"`
}

type rawVolume struct {
	Name        string `toml:"name"`
	Path        string `toml:"path"`
	Quota       any    `toml:"quota"`
	Move        bool   `toml:"move"`
	RecordSize  any    `toml:"recordsize"`
	Compression string `toml:"compression"`
}

type rawBind struct {
	Host     string `toml:"host"`
	Path     string `toml:"path"`
	ReadOnly bool   `toml:"read_only"`
}

type rawReadiness struct {
	HTTP        *string  `toml:"http"`
	TCP         *bool    `toml:"tcp"`
	Exec        []string `toml:"exec"`
	Port        int      `toml:"port"`
	Interval    string   `toml:"interval"`
	Timeout     string   `toml:"timeout"`
	Retries     *int     `toml:"retries"`
	StartPeriod string   `toml:"start_period"`
}

// bindMountKeys are keys people write in a volume when they want a host
// directory in the container; that is a bind, declared apart.
var bindMountKeys = map[string]bool{"source": true, "host_path": true, "bind": true, "type": true, "hostpath": true}

var envKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ParseFile reads and parses a manifest file.
func ParseFile(file string) (*Manifest, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	return Parse(file, data)
}

// Options are what the daemon that parses a manifest allows.
type Options struct {
	// BindPrefixes are the host directories under which binds may be
	// made (`droverd --allow-bind`); none: no bind is allowed.
	BindPrefixes []string
}

// Parse parses a manifest with no binds allowed; file names it in errors.
func Parse(file string, data []byte) (*Manifest, error) {
	return ParseWith(file, data, Options{})
}

// ParseWith parses a manifest under the daemon's options.
func ParseWith(file string, data []byte, opts Options) (*Manifest, error) {
	var raw rawManifest
	md, err := toml.Decode(string(data), &raw)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, Errors{{File: file, Line: pe.Position.Line, Key: pe.LastKey, Msg: pe.Message}}
		}
		return nil, Errors{{File: file, Msg: strings.TrimPrefix(err.Error(), "toml: ")}}
	}
	p := &parser{file: file, lines: keyLines(string(data)), opts: opts}
	for _, k := range md.Undecoded() {
		if len(k) > 3 && k[0] == "services" && k[2] == "secrets" {
			continue // a secret's table: read and checked by secrets
		}
		last := k[len(k)-1]
		msg := "unknown key"
		if bindMountKeys[last] {
			msg = "unknown key: a volume is a dataset that moves with its service; a host directory is a bind ([[services.NAME.binds]] host, path), which pins the service to its machine"
		}
		p.add(k.String(), "%s", msg)
	}
	m := p.build(raw)
	if len(p.errs) > 0 {
		sort.SliceStable(p.errs, func(i, j int) bool { return p.errs[i].Line < p.errs[j].Line })
		return nil, p.errs
	}
	return m, nil
}

type parser struct {
	file  string
	lines map[string]int
	errs  Errors
	opts  Options
}

// mountPath checks where a volume or bind is mounted in the container:
// absolute and clean, not the root, not in the kernel's trees, not twice.
func (p *parser) mountPath(key, mp string, mounted map[string]bool) {
	switch {
	case !strings.HasPrefix(mp, "/") || path.Clean(mp) != mp || hasControl(mp):
		p.add(key, "%q: want an absolute, clean path in the container", mp)
	case mp == "/":
		p.add(key, "\"/\": a volume or bind cannot replace the container's root")
	case underAny(mp, "/proc", "/sys", "/dev"):
		p.add(key, "%q: not under /proc, /sys or /dev, which the kernel and the engine own", mp)
	case mounted[mp]:
		p.add(key, "%q is mounted twice in this service", mp)
	}
	mounted[mp] = true
}

// bindAllowed tells whether a host directory is under an allowed prefix.
func (p *parser) bindAllowed(host string) bool {
	for _, pre := range p.opts.BindPrefixes {
		if underAny(host, path.Clean(pre)) {
			return true
		}
	}
	return false
}

// underAny tells whether p is one of dirs or below one.
func underAny(p string, dirs ...string) bool {
	for _, d := range dirs {
		if p == d || strings.HasPrefix(p, strings.TrimSuffix(d, "/")+"/") {
			return true
		}
	}
	return false
}

func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

func listOrNone(xs []string) string {
	if len(xs) == 0 {
		return "none"
	}
	return strings.Join(xs, ", ")
}

func (p *parser) add(key, format string, args ...any) {
	p.errs = append(p.errs, &Error{File: p.file, Line: p.line(key), Key: key, Msg: fmt.Sprintf(format, args...)})
}

// line finds a key's line: the key itself, else its nearest parent.
func (p *parser) line(key string) int {
	for k := key; k != ""; {
		if l, ok := p.lines[k]; ok {
			return l
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

func (p *parser) build(raw rawManifest) *Manifest {
	m := &Manifest{Namespace: raw.Namespace}
	switch {
	case raw.Namespace == "":
		p.add("namespace", "missing: every manifest names its namespace")
	case !fsm.ValidName(raw.Namespace):
		p.add("namespace", "%q is not a DNS label (a-z, 0-9, -; at most 63)", raw.Namespace)
	}
	if len(raw.Services) == 0 {
		p.add("services", "no services")
	}
	names := make([]string, 0, len(raw.Services))
	for n := range raw.Services {
		names = append(names, n)
	}
	sort.Strings(names)
	volumeUser := map[string]string{}
	for _, name := range names {
		if sp, ok := p.service(name, raw.Services[name], volumeUser); ok {
			m.Services = append(m.Services, sp)
			if p.move("services."+name, raw.Services[name]) {
				if m.Move == nil {
					m.Move = map[string]bool{}
				}
				m.Move[name] = true
			}
		}
	}
	return m
}

func (p *parser) service(name string, rs rawService, volumeUser map[string]string) (fsm.ServiceSpec, bool) {
	key := "services." + name
	before := len(p.errs)
	sp := fsm.ServiceSpec{Name: name, Image: rs.Image, Command: rs.Command, Machine: rs.Machine}
	if !fsm.ValidName(name) {
		p.add(key, "service name %q is not a DNS label", name)
	}
	if rs.Image == "" {
		p.add(key+".image", "missing: a service needs an image")
	}
	if rs.Machine != "" && !fsm.ValidName(rs.Machine) {
		p.add(key+".machine", "%q is not a machine name (a DNS label)", rs.Machine)
	}
	if rs.Memory != nil {
		sp.MemoryBytes = p.size(key+".memory", rs.Memory)
	}
	if len(rs.Env) > 0 {
		sp.Env = map[string]string{}
		for k, v := range rs.Env {
			if !envKey.MatchString(k) {
				p.add(key+".env."+k, "%q is not an environment variable name", k)
			}
			sp.Env[k] = v
		}
	}
	seenPort := map[string]bool{}
	for i, rp := range rs.Ports {
		pk := fmt.Sprintf("%s.ports[%d]", key, i)
		pm := fsm.PortMapping{Port: rp.Port, Target: rp.Target, Protocol: rp.Protocol}
		if pm.Target == 0 {
			pm.Target = pm.Port
		}
		if pm.Protocol == "" {
			pm.Protocol = "tcp"
		}
		if pm.Port < 1 || pm.Port > 65535 {
			p.add(pk+".port", "%d is not a port (1-65535)", rp.Port)
		}
		if pm.Target < 1 || pm.Target > 65535 {
			p.add(pk+".target", "%d is not a port (1-65535)", rp.Target)
		}
		if pm.Protocol != "tcp" && pm.Protocol != "udp" {
			p.add(pk+".protocol", "%q: want tcp or udp", rp.Protocol)
		}
		if id := fmt.Sprintf("%d/%s", pm.Port, pm.Protocol); seenPort[id] {
			p.add(pk+".port", "port %s is listed twice", id)
		} else {
			seenPort[id] = true
		}
		sp.Ports = append(sp.Ports, pm)
	}
	seenVol := map[string]bool{}
	mounted := map[string]bool{} // container paths of volumes and binds
	for i, rv := range rs.Volumes {
		vk := fmt.Sprintf("%s.volumes[%d]", key, i)
		vm := fsm.VolumeMount{Name: rv.Name, MountPath: rv.Path}
		switch {
		case rv.Name == "":
			p.add(vk+".name", "missing: a volume needs a name")
		case !fsm.ValidName(rv.Name):
			p.add(vk+".name", "volume name %q is not a DNS label", rv.Name)
		case seenVol[rv.Name]:
			p.add(vk+".name", "volume %q is listed twice in service %s", rv.Name, name)
		case volumeUser[rv.Name] != "":
			p.add(vk+".name", "volume %q is already used by service %s: a volume belongs to one service", rv.Name, volumeUser[rv.Name])
		}
		seenVol[rv.Name] = true
		if volumeUser[rv.Name] == "" {
			volumeUser[rv.Name] = name
		}
		p.mountPath(vk+".path", rv.Path, mounted)
		if rv.Quota == nil {
			p.add(vk+".quota", "missing: a volume needs a quota")
		} else {
			vm.QuotaBytes = p.size(vk+".quota", rv.Quota)
			if vm.QuotaBytes > maxQuota {
				p.add(vk+".quota", "over the limit of 1 PiB")
			}
		}
		if rv.RecordSize != nil {
			vm.RecordSize = p.size(vk+".recordsize", rv.RecordSize)
			if vm.RecordSize != 0 && (vm.RecordSize < minRecordSize || vm.RecordSize > maxRecordSize || vm.RecordSize&(vm.RecordSize-1) != 0) {
				p.add(vk+".recordsize", "%d bytes: want a power of two from 512B to 1MiB (ZFS's own limits; zfs-fuse stops at 128KiB)", vm.RecordSize)
			}
		}
		if rv.Compression != "" {
			if !validCompression(rv.Compression) {
				p.add(vk+".compression", "%q: want on, off, lz4, zstd, lzjb, zle, gzip or gzip-1 to gzip-9", rv.Compression)
			}
			vm.Compression = rv.Compression
		}
		sp.Volumes = append(sp.Volumes, vm)
	}
	for i, rb := range rs.Binds {
		bk := fmt.Sprintf("%s.binds[%d]", key, i)
		if !strings.HasPrefix(rb.Host, "/") || path.Clean(rb.Host) != rb.Host || hasControl(rb.Host) {
			p.add(bk+".host", "%q: want an absolute, clean path on the machine", rb.Host)
		} else if !p.bindAllowed(rb.Host) {
			p.add(bk+".host", "%q is under no host directory this daemon allows binds from (droverd --allow-bind; allowed: %s)", rb.Host, listOrNone(p.opts.BindPrefixes))
		}
		p.mountPath(bk+".path", rb.Path, mounted)
		sp.Binds = append(sp.Binds, fsm.BindMount{HostPath: rb.Host, MountPath: rb.Path, ReadOnly: rb.ReadOnly})
	}
	if len(rs.Binds) > 0 && rs.Machine == "" {
		p.add(key+".machine", "missing: a service with binds runs where its host directories are; name that machine")
	}
	if rs.Readiness != nil {
		sp.Readiness = p.readiness(key+".readiness", rs.Readiness, sp.Ports)
	}
	p.stopping(key, rs, &sp)
	p.process(key, rs, &sp, mounted)
	p.supervision(key, rs, &sp)
	if rs.Standby != nil {
		sp.Standby = p.standby(key+".standby", rs)
	}
	p.secrets(key, rs.Secrets, &sp, mounted)
	if rs.Flush != nil {
		if len(rs.Flush) == 0 || rs.Flush[0] == "" {
			p.add(key+".flush", "empty command: leave the key out instead")
		}
		sp.Flush = rs.Flush
	}
	if len(p.errs) > before {
		return sp, false
	}
	if err := fsm.ValidateSpec(sp); err != nil {
		p.add(key, "%v", err)
		return sp, false
	}
	return sp, true
}

// move reads the volumes' move marks: all or none, since a service moves
// with every volume it has, and only together with a placement.
func (p *parser) move(key string, rs rawService) bool {
	marked := 0
	for _, v := range rs.Volumes {
		if v.Move {
			marked++
		}
	}
	switch {
	case marked == 0:
		return false
	case marked != len(rs.Volumes):
		p.add(key+".volumes", "%d of %d volumes are marked move = true: a service moves with all its volumes or none", marked, len(rs.Volumes))
	case rs.Machine == "":
		p.add(key+".machine", "missing: volumes marked move = true need the machine to move to")
	}
	return true
}

func (p *parser) readiness(key string, rr *rawReadiness, ports []fsm.PortMapping) *fsm.Readiness {
	return p.check(key, rr, ports, &fsm.Readiness{Port: rr.Port, Interval: 2 * time.Second, Timeout: time.Second, Retries: 30})
}

// check reads a readiness or health check over its defaults rd.
func (p *parser) check(key string, rr *rawReadiness, ports []fsm.PortMapping, rd *fsm.Readiness) *fsm.Readiness {
	kinds := 0
	if rr.HTTP != nil {
		kinds++
		rd.Kind, rd.Path = "http", *rr.HTTP
		if !strings.HasPrefix(rd.Path, "/") {
			p.add(key+".http", "%q: want a path starting with /", rd.Path)
		}
	}
	if rr.TCP != nil {
		kinds++
		rd.Kind = "tcp"
		if !*rr.TCP {
			p.add(key+".tcp", "false: leave the check out instead")
		}
	}
	if rr.Exec != nil {
		kinds++
		rd.Kind, rd.Command = "exec", rr.Exec
		if len(rr.Exec) == 0 {
			p.add(key+".exec", "empty command")
		}
	}
	if kinds != 1 {
		p.add(key, "want exactly one of http, tcp or exec, found %d", kinds)
	}
	if rd.Kind != "exec" && rd.Port == 0 {
		if len(ports) == 0 {
			p.add(key+".port", "missing: no port to check (the service publishes none)")
		} else {
			rd.Port = ports[0].Target
		}
	}
	if rd.Port < 0 || rd.Port > 65535 {
		p.add(key+".port", "%d is not a port", rd.Port)
	}
	for _, d := range []struct {
		name string
		text string
		dst  *time.Duration
	}{{"interval", rr.Interval, &rd.Interval}, {"timeout", rr.Timeout, &rd.Timeout}, {"start_period", rr.StartPeriod, &rd.StartPeriod}} {
		if d.text == "" {
			continue
		}
		v, err := time.ParseDuration(d.text)
		if err != nil || v < 0 || (v == 0 && d.name != "start_period") {
			p.add(key+"."+d.name, "%q is not a positive duration like 2s", d.text)
			continue
		}
		if v > maxReadinessDuration {
			p.add(key+"."+d.name, "%q is over the limit of %s", d.text, maxReadinessDuration)
			continue
		}
		*d.dst = v
	}
	if rr.Retries != nil {
		if *rr.Retries < 0 || *rr.Retries > maxReadinessRetries {
			p.add(key+".retries", "%d: want 0 to %d", *rr.Retries, maxReadinessRetries)
		}
		rd.Retries = *rr.Retries
	}
	return rd
}

// stopSignals are the signals a manifest may name to stop a container.
var stopSignals = map[string]bool{"SIGTERM": true, "SIGINT": true, "SIGQUIT": true, "SIGHUP": true,
	"SIGUSR1": true, "SIGUSR2": true, "SIGWINCH": true, "SIGPWR": true, "SIGKILL": true}

// stopping reads stop_signal and stop_timeout.
func (p *parser) stopping(key string, rs rawService, sp *fsm.ServiceSpec) {
	if rs.StopSignal != "" {
		sig := strings.ToUpper(rs.StopSignal)
		if !strings.HasPrefix(sig, "SIG") {
			sig = "SIG" + sig
		}
		if !stopSignals[sig] {
			p.add(key+".stop_signal", "%q: want one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGPWR, SIGKILL", rs.StopSignal)
		}
		sp.StopSignal = sig
	}
	if rs.StopTimeout != "" {
		v, err := time.ParseDuration(rs.StopTimeout)
		switch {
		case err != nil || v <= 0:
			p.add(key+".stop_timeout", "%q is not a positive duration like 30s", rs.StopTimeout)
		case v > maxStopTimeout:
			p.add(key+".stop_timeout", "%q is over the limit of %s", rs.StopTimeout, maxStopTimeout)
		case v < time.Second:
			p.add(key+".stop_timeout", "%q: want at least 1s (Docker counts whole seconds)", rs.StopTimeout)
		default:
			sp.StopTimeout = v.Truncate(time.Second)
		}
	}
}

// Bounds of what a manifest may ask.
const (
	maxStopTimeout       = time.Hour
	maxReadinessDuration = time.Hour
	maxReadinessRetries  = 10000
	maxQuota             = 1 << 50 // 1 PiB
	maxLabels            = 64
	maxLabelValue        = 1024
	maxTmpfs             = 64 << 30
	minRecordSize        = 512
	maxRecordSize        = 1 << 20
)

var sizeRE = regexp.MustCompile(`^([0-9]+)\s*([KMGT]i?B?|B)?$`)

var sizeUnits = map[string]uint64{"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

// size reads a positive size: an integer of bytes or "512MiB", "2G", ...
// userRE is a container user: a name or id, with a group after ':'.
var userRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$`)

// labelKeyRE is a container label key (reverse-DNS style).
var labelKeyRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._/-]{0,126}[a-z0-9])?$`)

// process reads entrypoint, user, working_dir, labels, read_only and
// tmpfs.
func (p *parser) process(key string, rs rawService, sp *fsm.ServiceSpec, mounted map[string]bool) {
	if rs.Entrypoint != nil {
		if len(rs.Entrypoint) == 0 || rs.Entrypoint[0] == "" {
			p.add(key+".entrypoint", "empty: leave the key out to keep the image's")
		}
		sp.Entrypoint = rs.Entrypoint
	}
	if rs.User != "" {
		if !userRE.MatchString(rs.User) {
			p.add(key+".user", "%q: want a user name or id, with an optional :group", rs.User)
		}
		sp.User = rs.User
	}
	if rs.WorkingDir != "" {
		if !strings.HasPrefix(rs.WorkingDir, "/") || path.Clean(rs.WorkingDir) != rs.WorkingDir || hasControl(rs.WorkingDir) {
			p.add(key+".working_dir", "%q: want an absolute, clean path in the container", rs.WorkingDir)
		}
		sp.WorkingDir = rs.WorkingDir
	}
	if len(rs.Labels) > 0 {
		if len(rs.Labels) > maxLabels {
			p.add(key+".labels", "%d labels: at most %d", len(rs.Labels), maxLabels)
		}
		sp.Labels = map[string]string{}
		for k, v := range rs.Labels {
			switch {
			case strings.HasPrefix(k, "sh.drover."):
				p.add(key+".labels."+k, "sh.drover.* labels are drover's own")
			case !labelKeyRE.MatchString(k):
				p.add(key+".labels."+k, "%q: want lower-case letters, digits, '.', '-', '_' and '/'", k)
			case len(v) > maxLabelValue || hasControl(v):
				p.add(key+".labels."+k, "the value: at most %d characters, no control characters", maxLabelValue)
			}
			sp.Labels[k] = v
		}
	}
	sp.ReadOnly = rs.ReadOnly
	for i, t := range rs.Tmpfs {
		tk := fmt.Sprintf("%s.tmpfs[%d]", key, i)
		p.mountPath(tk+".path", t.Path, mounted)
		m := fsm.TmpfsMount{MountPath: t.Path}
		if t.Size != nil {
			m.SizeBytes = p.size(tk+".size", t.Size)
			if m.SizeBytes > maxTmpfs {
				p.add(tk+".size", "over the limit of 64 GiB")
			}
		}
		sp.Tmpfs = append(sp.Tmpfs, m)
	}
}

// validCompression tells whether ZFS knows the compression; a pool that
// lacks one (zfs-fuse has neither lz4 nor zstd) says so when it is set.
func validCompression(c string) bool {
	switch c {
	case "on", "off", "lz4", "zstd", "lzjb", "zle", "gzip":
		return true
	}
	level, ok := strings.CutPrefix(c, "gzip-")
	return ok && len(level) == 1 && level[0] >= '1' && level[0] <= '9'
}

func (p *parser) size(key string, v any) uint64 {
	switch x := v.(type) {
	case int64:
		if x <= 0 {
			p.add(key, "%d: a size must be positive", x)
			return 0
		}
		return uint64(x)
	case string:
		m := sizeRE.FindStringSubmatch(strings.TrimSpace(x))
		if m == nil {
			p.add(key, "%q is not a size like 512MiB or 2G", x)
			return 0
		}
		n, err := strconv.ParseUint(m[1], 10, 64)
		unit := sizeUnits[strings.TrimSuffix(strings.TrimSuffix(m[2], "B"), "i")]
		if m[2] == "B" {
			unit = 1
		}
		if err != nil || n == 0 || n > math.MaxUint64/unit {
			p.add(key, "%q is not a positive size that fits in 64 bits", x)
			return 0
		}
		return n * unit
	}
	p.add(key, "want a size like \"512MiB\" or a number of bytes")
	return 0
}

// Bounds of supervision and secrets.
const (
	maxRestarts  = 1000
	maxMilliCPUs = 1024 * 1000
	maxSecretUID = 1<<31 - 1
)

// supervision reads restart, restart_max, health and cpus.
func (p *parser) supervision(key string, rs rawService, sp *fsm.ServiceSpec) {
	switch rs.Restart {
	case "", fsm.RestartAlways, fsm.RestartOnFailure, fsm.RestartNo:
		if rs.Restart != fsm.RestartAlways {
			sp.Restart = rs.Restart // "always" is the default, written ""
		}
	default:
		p.add(key+".restart", "%q: want always, on-failure or no", rs.Restart)
	}
	if rs.RestartMax != nil {
		switch {
		case rs.Restart != fsm.RestartOnFailure:
			p.add(key+".restart_max", "only with restart = \"on-failure\"")
		case *rs.RestartMax < 1 || *rs.RestartMax > maxRestarts:
			p.add(key+".restart_max", "%d: want 1 to %d", *rs.RestartMax, maxRestarts)
		default:
			sp.RestartMax = *rs.RestartMax
		}
	}
	if rs.Health != nil {
		sp.Health = p.check(key+".health", rs.Health, sp.Ports, &fsm.Readiness{Port: rs.Health.Port, Interval: 10 * time.Second, Timeout: 2 * time.Second, Retries: 3})
		if sp.Health.Retries < 1 {
			p.add(key+".health.retries", "0: a health check restarts after at least 1 failure")
		}
	}
	if rs.CPUs != nil {
		var cores float64
		switch x := rs.CPUs.(type) {
		case int64:
			cores = float64(x)
		case float64:
			cores = x
		case string:
			v, err := strconv.ParseFloat(x, 64)
			if err != nil {
				p.add(key+".cpus", "%q is not a number of cores like 0.5 or 2", x)
				return
			}
			cores = v
		default:
			p.add(key+".cpus", "want a number of cores like 0.5 or 2")
			return
		}
		milli := math.Round(cores * 1000)
		if milli < 1 || milli > maxMilliCPUs {
			p.add(key+".cpus", "%g: want 0.001 to %d cores", cores, maxMilliCPUs/1000)
			return
		}
		sp.MilliCPUs = uint64(milli)
	}
}

// secrets reads the secrets a service names: "NAME", or a table with
// name, path, uid, gid and mode (a string of octal digits like "0440").
func (p *parser) secrets(key string, raw []any, sp *fsm.ServiceSpec, mounted map[string]bool) {
	seen := map[string]bool{}
	for i, r := range raw {
		sk := fmt.Sprintf("%s.secrets[%d]", key, i)
		sm := fsm.SecretMount{Mode: 0o400}
		switch x := r.(type) {
		case string:
			sm.Name = x
		case map[string]any:
			for k, v := range x {
				switch k {
				case "name", "path":
					s, ok := v.(string)
					if !ok {
						p.add(sk+"."+k, "want a string")
						continue
					}
					if k == "name" {
						sm.Name = s
					} else {
						sm.Path = s
					}
				case "uid", "gid":
					n, ok := v.(int64)
					if !ok || n < 0 || n > maxSecretUID {
						p.add(sk+"."+k, "want an id from 0 to %d", maxSecretUID)
						continue
					}
					if k == "uid" {
						sm.UID = int(n)
					} else {
						sm.GID = int(n)
					}
				case "mode":
					s, _ := v.(string)
					m, err := strconv.ParseUint(s, 8, 32)
					if err != nil || m&^0o777 != 0 || m&0o444 == 0 {
						p.add(sk+".mode", "want a readable file mode in octal like \"0440\"")
						continue
					}
					sm.Mode = uint32(m)
				default:
					p.add(sk+"."+k, "unknown key (want name, path, uid, gid or mode)")
				}
			}
		default:
			p.add(sk, "want a secret's name or a table with its name")
			continue
		}
		if !fsm.ValidName(sm.Name) {
			p.add(sk+".name", "%q is not a secret name (a DNS label)", sm.Name)
			continue
		}
		if seen[sm.Name] {
			p.add(sk+".name", "secret %q is listed twice", sm.Name)
		}
		seen[sm.Name] = true
		if sm.Path == "" {
			sm.Path = "/run/secrets/" + sm.Name
		}
		p.mountPath(sk+".path", sm.Path, mounted)
		sp.Secrets = append(sp.Secrets, sm)
	}
}

// standby reads a service's standby table.
func (p *parser) standby(key string, rs rawService) *fsm.StandbySpec {
	st := &fsm.StandbySpec{Machine: rs.Standby.Machine, Interval: 30 * time.Second}
	if st.Machine != "" && !fsm.ValidName(st.Machine) {
		p.add(key+".machine", "%q is not a machine name", st.Machine)
	}
	if st.Machine != "" && st.Machine == rs.Machine {
		p.add(key+".machine", "%q is where the service runs: a standby is another machine", st.Machine)
	}
	if len(rs.Volumes) == 0 {
		p.add(key, "service has no volumes: a standby keeps copies of volumes")
	}
	if len(rs.Binds) > 0 {
		p.add(key, "a service with binds cannot have a standby: its host directories stay on its machine")
	}
	read := func(k, text string, lo, hi time.Duration, dst *time.Duration) {
		if text == "" {
			return
		}
		v, err := time.ParseDuration(text)
		switch {
		case err != nil:
			p.add(key+"."+k, "%q is not a duration like 30s", text)
		case v < lo || v > hi:
			p.add(key+"."+k, "%q: want %s to %s", text, lo, hi)
		default:
			*dst = v
		}
	}
	read("interval", rs.Standby.Interval, time.Second, 24*time.Hour, &st.Interval)
	switch rs.Standby.Failover {
	case "", fsm.FailoverManual:
	case fsm.FailoverAuto:
		st.Failover, st.After = fsm.FailoverAuto, 30*time.Second
	default:
		p.add(key+".failover", "%q: want manual or auto", rs.Standby.Failover)
	}
	if rs.Standby.After != "" && st.Failover != fsm.FailoverAuto {
		p.add(key+".after", "only with failover = \"auto\"")
	} else {
		read("after", rs.Standby.After, 0, 24*time.Hour, &st.After)
	}
	return st
}
