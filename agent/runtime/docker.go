// Package runtime runs drover's services as Docker containers: labelled
// with what they are, their volumes mounted, their ports published on the
// service IP, their readiness checked as the manifest says.
package runtime

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/docker/client"
	"github.com/docker/go-connections/nat"
	"github.com/drover-sh/drover/fsm"
)

// Labels put on every container drover runs.
const (
	LabelNamespace  = "sh.drover.namespace"
	LabelService    = "sh.drover.service"
	LabelGeneration = "sh.drover.generation"
	LabelMachine    = "sh.drover.machine"
	LabelSpecHash   = "sh.drover.spec-hash"
	// LabelHeld marks a container made by CreateHeld.
	LabelHeld = "sh.drover.held"
)

// Docker talks to one Docker engine, negotiating the API version.
type Docker struct {
	cli         *client.Client
	machineID   string
	machineName string      // named in errors
	creds       Credentials // registry logins, for pulls and digests
	aliases     aliases     // references of loaded images
	holdBinary  string      // drover-hold; empty: no held containers
	holdDir     string      // held containers' marker directories
	secrets     Secrets     // nil: services with secrets cannot run here
	secretsDir  string      // a tmpfs: each container's secret files
	resolver    netip.Addr  // drover's DNS; invalid: the engine's
}

// Secrets opens a namespace's secrets: the plaintext, to be written only
// to the secrets tmpfs.
type Secrets interface {
	Open(namespace, name string) ([]byte, error)
}

// DockerConfig is what NewDocker needs.
type DockerConfig struct {
	Host        string // the engine, e.g. unix:///var/run/docker.sock
	MachineID   string
	MachineName string
	Credentials Credentials
	// AliasFile keeps which loaded image a pinned reference names (in the
	// daemon's data dir); empty: images cannot be loaded.
	AliasFile string
	// HoldBinary is drover-hold (static), and HoldDir a directory of the
	// daemon's where each held container gets its release marker. Both
	// set: a move's target can hold a started container (CreateHeld).
	HoldBinary string
	HoldDir    string
	// Secrets opens secrets, and SecretsDir (a tmpfs) holds the files
	// the containers mount.
	Secrets    Secrets
	SecretsDir string
	// Resolver is drover's DNS, which containers are given (with
	// NAMESPACE.drover to search); invalid: the engine's default.
	Resolver netip.Addr
}

// NewDocker connects to the engine.
func NewDocker(cfg DockerConfig) (*Docker, error) {
	cli, err := client.NewClientWithOpts(client.WithHost(cfg.Host), client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker client for %s: %w", cfg.Host, err)
	}
	return &Docker{cli: cli, machineID: cfg.MachineID, machineName: cfg.MachineName, creds: cfg.Credentials, aliases: aliases{file: cfg.AliasFile},
		holdBinary: cfg.HoldBinary, holdDir: cfg.HoldDir, secrets: cfg.Secrets, secretsDir: cfg.SecretsDir, resolver: cfg.Resolver}, nil
}

// Close releases the client.
func (d *Docker) Close() error { return d.cli.Close() }

// Container is a container drover runs.
type Container struct {
	ID         string
	Name       string
	Namespace  string
	Service    string
	Generation uint64
	SpecHash   string
	Running    bool
	StartedAt  time.Time
	// Held: the container runs drover-hold, waiting to be released into
	// the service's command (see CreateHeld).
	Held bool
	// State is the engine's: created, running, restarting, exited, ...
	State string
	// Restarts counts the engine's restarts of it after its process
	// ended; LastExit is how that process last ended (nil: never).
	Restarts int
	LastExit *fsm.Exit
}

// Key is namespace/service.
func (c Container) Key() string { return c.Namespace + "/" + c.Service }

// RunSpec is everything needed to run one service here.
type RunSpec struct {
	Namespace  string
	Spec       fsm.ServiceSpec
	Generation uint64
	ServiceIP  netip.Addr
	Mounts     map[string]string // volume name -> host path of its dataset
}

// Hash identifies what the container is made from: the spec, the service
// IP and the mounts. A container whose hash differs must be re-created.
func (r RunSpec) Hash() string {
	spec := r.Spec
	spec.Machine = "" // placement is not the container's: a move does not re-create it
	if spec.Standby != nil {
		spec.Standby = &fsm.StandbySpec{} // that there is one decides the restart policy; its settings are not the container's
	}
	// A volume's ZFS properties are the dataset's, set in place: changing
	// them does not re-create the container.
	spec.Flush = nil // run by a move in the running container
	spec.Volumes = slices.Clone(spec.Volumes)
	for i := range spec.Volumes {
		spec.Volumes[i].RecordSize, spec.Volumes[i].Compression = 0, ""
	}
	b, _ := json.Marshal(struct {
		Spec   fsm.ServiceSpec
		IP     netip.Addr
		Mounts map[string]string
	}{spec, r.ServiceIP, r.Mounts})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// ContainerName is the name drover gives a service's container.
func ContainerName(namespace, service string) string { return "drover-" + namespace + "-" + service }

// List returns the containers drover runs on this machine.
func (d *Docker) List(ctx context.Context) ([]Container, error) {
	list, err := d.cli.ContainerList(ctx, container.ListOptions{All: true,
		Filters: filters.NewArgs(filters.Arg("label", LabelMachine+"="+d.machineID))})
	if err != nil {
		return nil, fmt.Errorf("listing containers: %w", err)
	}
	var out []Container
	for _, c := range list {
		gen, _ := strconv.ParseUint(c.Labels[LabelGeneration], 10, 64)
		ct := Container{ID: c.ID, Namespace: c.Labels[LabelNamespace], Service: c.Labels[LabelService],
			Generation: gen, SpecHash: c.Labels[LabelSpecHash], Running: c.State == "running", Held: c.Labels[LabelHeld] != ""}
		if len(c.Names) > 0 {
			ct.Name = c.Names[0][1:]
		}
		ct.State = c.State
		if insp, err := d.cli.ContainerInspect(ctx, c.ID); err == nil && insp.State != nil {
			if ct.Running {
				ct.StartedAt, _ = time.Parse(time.RFC3339Nano, insp.State.StartedAt)
			}
			ct.Restarts = insp.RestartCount
			if ended, err := time.Parse(time.RFC3339Nano, insp.State.FinishedAt); err == nil && ended.Year() > 1 {
				ct.LastExit = &fsm.Exit{Code: insp.State.ExitCode, At: ended}
				if insp.State.OOMKilled {
					ct.LastExit.Reason = "oom-killed"
				}
			}
		}
		out = append(out, ct)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out, nil
}

// HasImage tells whether the engine has the image (loaded ones too).
func (d *Docker) HasImage(ctx context.Context, image string) (bool, error) {
	local, err := d.local(ctx, image)
	return local != "", err
}

// Start creates and starts the service's container.
func (d *Docker) Start(ctx context.Context, r RunSpec) (Container, error) {
	c, err := d.Create(ctx, r)
	if err != nil {
		return Container{}, err
	}
	if err := d.cli.ContainerStart(ctx, c.ID, container.StartOptions{}); err != nil {
		d.cli.ContainerRemove(context.WithoutCancel(ctx), c.ID, container.RemoveOptions{Force: true})
		return Container{}, fmt.Errorf("starting container %s: %w", c.Name, err)
	}
	c.Running = true
	return c, nil
}

// Create creates the service's container without starting it: a
// migration's target does it before the source stops, so the cutover
// only starts it (Restart).
func (d *Docker) Create(ctx context.Context, r RunSpec) (Container, error) {
	return d.create(ctx, r, false)
}

func (d *Docker) create(ctx context.Context, r RunSpec, held bool) (Container, error) {
	name := ContainerName(r.Namespace, r.Spec.Name)
	env := make([]string, 0, len(r.Spec.Env))
	for k, v := range r.Spec.Env {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	exposed := nat.PortSet{}
	bindings := nat.PortMap{}
	for _, p := range r.Spec.Ports {
		cp := nat.Port(fmt.Sprintf("%d/%s", p.Target, p.Protocol))
		exposed[cp] = struct{}{}
		bindings[cp] = append(bindings[cp], nat.PortBinding{HostIP: r.ServiceIP.String(), HostPort: strconv.Itoa(p.Port)})
	}
	var mounts []mount.Mount
	for _, v := range r.Spec.Volumes {
		src, ok := r.Mounts[v.Name]
		if !ok {
			return Container{}, fmt.Errorf("service %s/%s: volume %s has no dataset on this machine", r.Namespace, r.Spec.Name, v.Name)
		}
		mounts = append(mounts, mount.Mount{Type: mount.TypeBind, Source: src, Target: v.MountPath})
	}
	for _, b := range r.Spec.Binds {
		mounts = append(mounts, mount.Mount{Type: mount.TypeBind, Source: b.HostPath, Target: b.MountPath, ReadOnly: b.ReadOnly})
	}
	labels := map[string]string{
		LabelNamespace: r.Namespace, LabelService: r.Spec.Name, LabelMachine: d.machineID,
		LabelGeneration: strconv.FormatUint(r.Generation, 10), LabelSpecHash: r.Hash(),
	}
	hc := &container.HostConfig{PortBindings: bindings, Mounts: mounts, RestartPolicy: restartPolicy(r.Spec)}
	if d.resolver.IsValid() {
		hc.DNS, hc.DNSSearch = []string{d.resolver.String()}, []string{r.Namespace + ".drover"}
	}
	if r.Spec.MemoryBytes > 0 {
		hc.Resources.Memory = int64(r.Spec.MemoryBytes)
	}
	if r.Spec.MilliCPUs > 0 {
		hc.Resources.NanoCPUs = int64(r.Spec.MilliCPUs) * 1_000_000
	}
	secretMounts, err := d.writeSecrets(name, r)
	if err != nil {
		return Container{}, err
	}
	hc.Mounts = append(hc.Mounts, secretMounts...)
	image, err := d.local(ctx, r.Spec.RunImage())
	if err != nil {
		return Container{}, err
	}
	if image == "" {
		image = r.Spec.RunImage() // the engine's own error names it
	}
	for k, v := range r.Spec.Labels {
		if _, ours := labels[k]; !ours {
			labels[k] = v
		}
	}
	if r.Spec.ReadOnly {
		hc.ReadonlyRootfs = true
	}
	if len(r.Spec.Tmpfs) > 0 {
		hc.Tmpfs = map[string]string{}
		for _, t := range r.Spec.Tmpfs {
			opts := "rw,nosuid,nodev"
			if t.SizeBytes > 0 {
				opts += ",size=" + strconv.FormatUint(t.SizeBytes, 10)
			}
			hc.Tmpfs[t.MountPath] = opts
		}
	}
	cfg := &container.Config{Image: image, Entrypoint: r.Spec.Entrypoint, Cmd: r.Spec.Command, Env: env, Labels: labels, ExposedPorts: exposed,
		StopSignal: r.Spec.StopSignal, User: r.Spec.User, WorkingDir: r.Spec.WorkingDir}
	if held {
		// drover-hold runs first and execs the service's own command, as
		// the engine would have run it, when released.
		argv, err := d.command(ctx, image, r.Spec.Entrypoint, r.Spec.Command)
		if err != nil {
			return Container{}, err
		}
		run := d.heldDir(name)
		if err := os.RemoveAll(run); err != nil {
			return Container{}, fmt.Errorf("clearing %s: %w", run, err)
		}
		if err := os.MkdirAll(run, 0o755); err != nil {
			return Container{}, fmt.Errorf("making %s: %w", run, err)
		}
		cfg.Entrypoint, cfg.Cmd = []string{holdPath}, argv
		labels[LabelHeld] = "1"
		hc.Mounts = append(hc.Mounts,
			mount.Mount{Type: mount.TypeBind, Source: d.holdBinary, Target: holdPath, ReadOnly: true},
			mount.Mount{Type: mount.TypeBind, Source: run, Target: holdRunDir, ReadOnly: true})
	}
	if r.Spec.StopTimeout > 0 {
		secs := int(r.Spec.StopTimeout.Seconds())
		cfg.StopTimeout = &secs
	}
	created, err := d.cli.ContainerCreate(ctx, cfg, hc, nil, nil, name)
	if err != nil {
		return Container{}, fmt.Errorf("creating container %s: %w", name, err)
	}
	return Container{ID: created.ID, Name: name, Namespace: r.Namespace, Service: r.Spec.Name,
		Generation: r.Generation, SpecHash: r.Hash(), Held: held}, nil
}

// restartPolicy is the engine's policy for the spec's restart.
func restartPolicy(spec fsm.ServiceSpec) container.RestartPolicy {
	if spec.Standby != nil {
		// Only droverd, which knows whether its lease holds, may start a
		// service that can be failed over: an engine coming back after
		// its host was cut off must not bring it up on its own.
		return container.RestartPolicy{Name: container.RestartPolicyDisabled}
	}
	switch spec.Restart {
	case fsm.RestartOnFailure:
		return container.RestartPolicy{Name: container.RestartPolicyOnFailure, MaximumRetryCount: spec.RestartMax}
	case fsm.RestartNo:
		return container.RestartPolicy{Name: container.RestartPolicyDisabled}
	}
	return container.RestartPolicy{Name: container.RestartPolicyUnlessStopped}
}

// writeSecrets writes the service's secrets as files in the secrets
// tmpfs, in a directory of the container's own, and returns their
// read-only bind mounts. The files are what the container sees until it
// is re-created or restarted by drover (WriteSecrets).
func (d *Docker) writeSecrets(name string, r RunSpec) ([]mount.Mount, error) {
	if len(r.Spec.Secrets) == 0 {
		return nil, nil
	}
	if d.secrets == nil || d.secretsDir == "" {
		return nil, fmt.Errorf("service %s/%s uses secrets, and this daemon cannot open them", r.Namespace, r.Spec.Name)
	}
	if err := ensureTmpfs(d.secretsDir); err != nil {
		return nil, err
	}
	dir := filepath.Join(d.secretsDir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("making %s: %w", dir, err)
	}
	var mounts []mount.Mount
	for _, sm := range r.Spec.Secrets {
		value, err := d.secrets.Open(r.Namespace, sm.Name)
		if err != nil {
			return nil, fmt.Errorf("service %s/%s: secret %s: %w", r.Namespace, r.Spec.Name, sm.Name, err)
		}
		file := filepath.Join(dir, sm.Name)
		if err := writeSecretFile(file, value, sm); err != nil {
			return nil, err
		}
		mounts = append(mounts, mount.Mount{Type: mount.TypeBind, Source: file, Target: sm.Path, ReadOnly: true})
	}
	return mounts, nil
}

// writeSecretFile replaces file (a new inode: a running container keeps
// the value it mounted) with value, owned and moded as sm asks.
func writeSecretFile(file string, value []byte, sm fsm.SecretMount) error {
	mode := os.FileMode(sm.Mode)
	if mode == 0 {
		mode = 0o400
	}
	tmp := file + ".new"
	os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("writing secret file: %w", err)
	}
	_, werr := f.Write(value)
	cerr := f.Close()
	if err := errors.Join(werr, cerr, os.Chown(tmp, sm.UID, sm.GID), os.Chmod(tmp, mode)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing secret file %s: %w", file, err)
	}
	if err := os.Rename(tmp, file); err != nil {
		return fmt.Errorf("writing secret file %s: %w", file, err)
	}
	return nil
}

// WriteSecrets rewrites the files of a service's secrets with their
// current values; the container sees them when it starts again.
func (d *Docker) WriteSecrets(r RunSpec) error {
	_, err := d.writeSecrets(ContainerName(r.Namespace, r.Spec.Name), r)
	return err
}

// Where drover-hold and its release marker's directory are in a held
// container.
const (
	holdPath   = "/.drover/hold"
	holdRunDir = "/.drover/run"
)

// CanHold tells whether this engine's containers can be held: droverd
// knows drover-hold and a directory for the markers.
func (d *Docker) CanHold() bool { return d.holdBinary != "" && d.holdDir != "" }

func (d *Docker) heldDir(name string) string { return filepath.Join(d.holdDir, name) }

// CreateHeld creates and starts the service's container with drover-hold
// as its first process: the engine sets up its network, mounts and
// published ports now, and Release later replaces drover-hold with the
// service's own command — a move's cutover then starts the service with
// an exec instead of a container start. It returns once drover-hold holds
// (its HoldingLine is in the container's log).
func (d *Docker) CreateHeld(ctx context.Context, r RunSpec) (Container, error) {
	if !d.CanHold() {
		return Container{}, errors.New("no drover-hold: containers cannot be held here")
	}
	c, err := d.create(ctx, r, true)
	if err != nil {
		return Container{}, err
	}
	fail := func(err error) (Container, error) {
		d.cli.ContainerRemove(context.WithoutCancel(ctx), c.ID, container.RemoveOptions{Force: true})
		return Container{}, err
	}
	if err := d.cli.ContainerStart(ctx, c.ID, container.StartOptions{}); err != nil {
		return fail(fmt.Errorf("starting held container %s: %w", c.Name, err))
	}
	if err := d.waitHolding(ctx, c.ID); err != nil {
		return fail(fmt.Errorf("held container %s: %w", c.Name, err))
	}
	c.Running = true
	return c, nil
}

// holdingLine is what drover-hold writes once it may be released
// (cmd/drover-hold.HoldingLine).
const holdingLine = "drover-hold: holding until released"

// waitHolding follows a held container's log until drover-hold says it
// holds: a release before that would kill it.
func (d *Docker) waitHolding(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	logs, err := d.cli.ContainerLogs(ctx, id, container.LogsOptions{ShowStderr: true, Follow: true})
	if err != nil {
		return fmt.Errorf("following its log: %w", err)
	}
	defer logs.Close()
	var seen strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := logs.Read(buf)
		seen.Write(buf[:n])
		if strings.Contains(seen.String(), holdingLine) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("drover-hold never said it holds (%v): %q", err, seen.String())
		}
	}
}

// Release lets a held container run the service: it leaves the marker (a
// later restart of the container runs the service at once) and signals
// drover-hold, which execs the service's command.
func (d *Docker) Release(ctx context.Context, c Container) error {
	name := c.Name
	if name == "" {
		name = ContainerName(c.Namespace, c.Service)
	}
	if err := os.WriteFile(filepath.Join(d.heldDir(name), "released"), nil, 0o644); err != nil {
		return fmt.Errorf("releasing %s: %w", name, err)
	}
	if err := d.cli.ContainerKill(ctx, c.ID, "SIGUSR1"); err != nil {
		return fmt.Errorf("releasing %s: %w", name, err)
	}
	return nil
}

// command is the command the engine would run for the image and the
// spec: the spec's entrypoint and command; or the image's entrypoint,
// then the spec's command or else the image's.
func (d *Docker) command(ctx context.Context, image string, entrypoint, cmd []string) ([]string, error) {
	if len(entrypoint) > 0 {
		return append(slices.Clone(entrypoint), cmd...), nil
	}
	insp, _, err := d.cli.ImageInspectWithRaw(ctx, image)
	if err != nil {
		return nil, fmt.Errorf("inspecting image %s: %w", image, err)
	}
	var argv []string
	if insp.Config != nil {
		argv = append(argv, insp.Config.Entrypoint...)
		if len(cmd) == 0 {
			cmd = insp.Config.Cmd
		}
	}
	argv = append(argv, cmd...)
	if len(argv) == 0 {
		return nil, fmt.Errorf("image %s names no command and the service gives none", image)
	}
	return argv, nil
}

// Remove stops (its stop signal, then SIGKILL after grace; with grace 0,
// after the container's own stop timeout) and removes a container.
func (d *Docker) Remove(ctx context.Context, id string, grace time.Duration) error {
	var opts container.StopOptions
	if grace > 0 {
		secs := int(grace.Seconds())
		opts.Timeout = &secs
	}
	var held, secrets string
	if insp, err := d.cli.ContainerInspect(ctx, id); err == nil && insp.Config != nil {
		name := strings.TrimPrefix(insp.Name, "/")
		if insp.Config.Labels[LabelHeld] != "" && d.holdDir != "" {
			held = d.heldDir(name)
		}
		if d.secretsDir != "" && name != "" {
			secrets = filepath.Join(d.secretsDir, name)
		}
	}
	if err := d.cli.ContainerStop(ctx, id, opts); err != nil && !client.IsErrNotFound(err) {
		return fmt.Errorf("stopping container %s: %w", id, err)
	}
	if err := d.cli.ContainerRemove(ctx, id, container.RemoveOptions{}); err != nil && !client.IsErrNotFound(err) {
		return fmt.Errorf("removing container %s: %w", id, err)
	}
	if held != "" {
		// Its release marker goes with it.
		if err := os.RemoveAll(held); err != nil {
			return fmt.Errorf("removing %s: %w", held, err)
		}
	}
	if secrets != "" {
		// And its secret files.
		if err := os.RemoveAll(secrets); err != nil {
			return fmt.Errorf("removing %s: %w", secrets, err)
		}
	}
	return nil
}

// ErrNotReady: the readiness check did not pass.
var ErrNotReady = errors.New("not ready")

// CheckOnce runs the service's readiness check once. Without a check, a
// running container is ready.
func (d *Docker) CheckOnce(ctx context.Context, c Container, r RunSpec) error {
	rd := r.Spec.Readiness
	if rd == nil {
		insp, err := d.cli.ContainerInspect(ctx, c.ID)
		if err != nil {
			return err
		}
		if !insp.State.Running {
			return fmt.Errorf("%w: container is %s", ErrNotReady, insp.State.Status)
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, rd.Timeout)
	defer cancel()
	addr, err := d.checkAddr(ctx, c, rd.Port)
	switch rd.Kind {
	case "http":
		if err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+rd.Path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNotReady, err)
		}
		resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			return fmt.Errorf("%w: GET %s: %s", ErrNotReady, rd.Path, resp.Status)
		}
		return nil
	case "tcp":
		if err != nil {
			return err
		}
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNotReady, err)
		}
		return conn.Close()
	case "exec":
		return d.execCheck(ctx, c, rd.Command)
	}
	return fmt.Errorf("unknown readiness kind %q", rd.Kind)
}

// checkAddr is the container's own address and port on its bridge, so a
// check tests the process, not the publishing.
func (d *Docker) checkAddr(ctx context.Context, c Container, port int) (string, error) {
	insp, err := d.cli.ContainerInspect(ctx, c.ID)
	if err != nil {
		return "", err
	}
	if !insp.State.Running {
		return "", fmt.Errorf("%w: container is %s", ErrNotReady, insp.State.Status)
	}
	for _, n := range insp.NetworkSettings.Networks {
		if n.IPAddress != "" {
			return net.JoinHostPort(n.IPAddress, strconv.Itoa(port)), nil
		}
	}
	return "", fmt.Errorf("%w: container has no address", ErrNotReady)
}

func (d *Docker) execCheck(ctx context.Context, c Container, cmd []string) error {
	code, err := d.Exec(ctx, c.ID, cmd)
	switch {
	case err != nil && ctx.Err() != nil:
		return fmt.Errorf("%w: %v: %v", ErrNotReady, cmd, err)
	case err != nil:
		return fmt.Errorf("readiness exec: %w", err)
	case code != 0:
		return fmt.Errorf("%w: %v exited %d", ErrNotReady, cmd, code)
	}
	return nil
}

// Exec runs cmd in a running container and returns its exit code once it
// ends (checked every 20 ms, then less often).
func (d *Docker) Exec(ctx context.Context, id string, cmd []string) (int, error) {
	ex, err := d.cli.ContainerExecCreate(ctx, id, container.ExecOptions{Cmd: cmd})
	if err != nil {
		return 0, err
	}
	if err := d.cli.ContainerExecStart(ctx, ex.ID, container.ExecStartOptions{Detach: true}); err != nil {
		return 0, err
	}
	wait := 20 * time.Millisecond
	for {
		insp, err := d.cli.ContainerExecInspect(ctx, ex.ID)
		if err != nil {
			return 0, err
		}
		if !insp.Running {
			return insp.ExitCode, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}

// WaitReady checks readiness as the spec says and returns the last
// failure when it never passes. The patience is the spec's (start period,
// then interval × (retries+1)), but the first checks come sooner than the
// interval — 10 ms, then doubling up to it — since a service that is
// ready at once should not wait a whole interval: in a migration that
// wait is downtime.
func (d *Docker) WaitReady(ctx context.Context, c Container, r RunSpec) error {
	rd := r.Spec.Readiness
	interval, retries, start := time.Second, 30, time.Duration(0)
	if rd != nil {
		interval, retries, start = rd.Interval, rd.Retries, rd.StartPeriod
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(start):
	}
	deadline := time.Now().Add(interval * time.Duration(retries+1))
	wait, checks := readyFirstWait, 0
	var err error
	for {
		checks++
		if err = d.CheckOnce(ctx, c, r); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("service %s/%s not ready after %d checks in %s: %w", r.Namespace, r.Spec.Name, checks, interval*time.Duration(retries+1), err)
		}
		wait = min(wait, interval)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last check: %v)", ctx.Err(), err)
		case <-time.After(wait):
		}
		wait *= 2
	}
}

// readyFirstWait is the pause after the first failed readiness check.
const readyFirstWait = 10 * time.Millisecond

// Stopped says how a container stopped.
type Stopped struct {
	// Killed: its stop signal did not end it within the grace period, and
	// it was killed (or its process exited on SIGKILL).
	Killed bool
}

// Stop stops a container and keeps it, so it can be started again: its
// stop signal (the service's stop_signal, else the image's STOPSIGNAL,
// else SIGTERM), then SIGKILL after grace.
func (d *Docker) Stop(ctx context.Context, id string, grace time.Duration) (Stopped, error) {
	secs := int(grace.Seconds())
	if err := d.cli.ContainerStop(ctx, id, container.StopOptions{Timeout: &secs}); err != nil {
		return Stopped{}, fmt.Errorf("stopping container %s: %w", id, err)
	}
	insp, err := d.cli.ContainerInspect(ctx, id)
	if err != nil {
		return Stopped{}, fmt.Errorf("inspecting stopped container %s: %w", id, err)
	}
	return Stopped{Killed: insp.State != nil && insp.State.ExitCode == 137 && !insp.State.OOMKilled}, nil
}

// Halt stops a container as Stop does, but returns as soon as no process
// of the container is left — the writes have stopped — rather than once
// the engine has also torn its network and mounts down (about 100 ms
// more on the lab's engines). It says whether the container had to be
// killed (a halt that took the whole grace period ended in the engine's
// SIGKILL). The caller must call wait, which returns once the engine's
// stop is over. Where the container's processes cannot be watched (no
// cgroup found), Halt waits for the engine.
func (d *Docker) Halt(ctx context.Context, id string, grace time.Duration) (Stopped, func() error, error) {
	procs := ""
	if insp, err := d.cli.ContainerInspect(ctx, id); err != nil {
		return Stopped{}, nil, fmt.Errorf("inspecting container %s: %w", id, err)
	} else if insp.State != nil && insp.State.Pid > 0 {
		procs = cgroupProcs(insp.State.Pid)
	}
	began := time.Now()
	done := make(chan struct{})
	var st Stopped
	var stopErr error
	go func() {
		defer close(done)
		st, stopErr = d.Stop(ctx, id, grace)
	}()
	wait := func() error {
		<-done
		return stopErr
	}
	if procs == "" {
		<-done
		return st, wait, stopErr
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if b, err := os.ReadFile(procs); err != nil || len(bytes.TrimSpace(b)) == 0 {
			// Empty, or gone with the container.
			return Stopped{Killed: time.Since(began) >= grace}, wait, nil
		}
		select {
		case <-done:
			return st, wait, stopErr
		case <-tick.C:
		}
	}
}

// cgroupProcs is the cgroup.procs file of the cgroup process pid is in:
// the unified hierarchy's on a cgroup v2 host, else the pids (or memory)
// controller's. Empty when none is found.
func cgroupProcs(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return ""
	}
	_, v2err := os.Stat("/sys/fs/cgroup/cgroup.controllers")
	for _, want := range []string{"", "pids", "memory"} {
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) != 3 {
				continue
			}
			var file string
			switch {
			case want == "" && parts[0] == "0" && v2err == nil:
				file = filepath.Join("/sys/fs/cgroup", parts[2], "cgroup.procs")
			case want != "" && slices.Contains(strings.Split(parts[1], ","), want):
				file = filepath.Join("/sys/fs/cgroup", want, parts[2], "cgroup.procs")
			default:
				continue
			}
			if _, err := os.Stat(file); err == nil {
				return file
			}
		}
	}
	return ""
}

// DefaultStopGrace is how long a stop waits for a container without a
// stop_timeout of its own before it kills it.
const DefaultStopGrace = 10 * time.Second

// StopGrace is the service's stop_timeout, or drover's default.
func StopGrace(spec fsm.ServiceSpec) time.Duration {
	if spec.StopTimeout > 0 {
		return spec.StopTimeout
	}
	return DefaultStopGrace
}

// Restart starts a stopped container again.
func (d *Docker) Restart(ctx context.Context, id string) error {
	if err := d.cli.ContainerStart(ctx, id, container.StartOptions{}); err != nil {
		return fmt.Errorf("starting container %s: %w", id, err)
	}
	return nil
}
