package fsm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// PortMapping publishes a container port on the service IP.
type PortMapping struct {
	Port     int    `json:"port"`     // on the service IP
	Target   int    `json:"target"`   // in the container
	Protocol string `json:"protocol"` // tcp or udp
}

// VolumeMount mounts a volume of the service's namespace into the container.
type VolumeMount struct {
	Name       string `json:"name"`       // DNS label, unique in the namespace
	MountPath  string `json:"mount_path"` // absolute path in the container
	QuotaBytes uint64 `json:"quota_bytes"`
	// RecordSize is the dataset's ZFS recordsize in bytes; zero keeps
	// ZFS's 128 KiB. A database's page size (8 KiB for PostgreSQL) makes
	// each page write a change of that size, not of a whole record, in
	// every increment a move sends.
	RecordSize uint64 `json:"recordsize,omitempty"`
	// Compression is the dataset's ZFS compression; empty is "on".
	Compression string `json:"compression,omitempty"`
}

// TmpfsMount is a memory-backed mount in the container; SizeBytes zero
// is the engine's default (half the memory).
type TmpfsMount struct {
	MountPath string `json:"mount_path"`
	SizeBytes uint64 `json:"size_bytes,omitempty"`
}

// BindMount mounts a directory of the host into the container. It does
// not move: a service with one is pinned to its machine, and a drain or a
// migration leaves it where it is and says why.
type BindMount struct {
	HostPath  string `json:"host_path"`  // absolute path on the machine
	MountPath string `json:"mount_path"` // absolute path in the container
	ReadOnly  bool   `json:"read_only,omitempty"`
}

// Readiness is how drover knows a service is ready.
type Readiness struct {
	Kind        string        `json:"kind"` // http, tcp or exec
	Path        string        `json:"path,omitempty"`
	Port        int           `json:"port,omitempty"`
	Command     []string      `json:"command,omitempty"`
	Interval    time.Duration `json:"interval"`
	Timeout     time.Duration `json:"timeout"`
	Retries     int           `json:"retries"`
	StartPeriod time.Duration `json:"start_period"`
}

// ServiceSpec is what an operator asks for one service.
type ServiceSpec struct {
	Name        string            `json:"name"`
	Image       string            `json:"image"`
	Command     []string          `json:"command,omitempty"`
	Env         map[string]string `json:"env,omitempty"`
	Ports       []PortMapping     `json:"ports,omitempty"`
	Volumes     []VolumeMount     `json:"volumes,omitempty"`
	Binds       []BindMount       `json:"binds,omitempty"`
	Readiness   *Readiness        `json:"readiness,omitempty"`
	MemoryBytes uint64            `json:"memory_bytes,omitempty"` // reserved for placement
	Machine     string            `json:"machine,omitempty"`      // placement asked for; empty: drover chooses
	// StopSignal replaces the image's STOPSIGNAL (empty: the image's, else
	// SIGTERM); StopTimeout is how long a stop waits before SIGKILL (zero:
	// drover's default grace).
	StopSignal  string        `json:"stop_signal,omitempty"`
	StopTimeout time.Duration `json:"stop_timeout,omitempty"`
	// Flush is a command a move runs in the container during its warm
	// copy, before the last round, to write out what the service holds in
	// memory (PostgreSQL: CHECKPOINT): what it writes travels while the
	// service runs, and the stop has little left to write.
	Flush []string `json:"flush,omitempty"`
	// Entrypoint replaces the image's (with it, the image's command is
	// not used: Command is the arguments); User, WorkingDir likewise.
	Entrypoint []string `json:"entrypoint,omitempty"`
	User       string   `json:"user,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	// Labels are put on the container beside drover's own (sh.drover.*,
	// which a manifest may not set).
	Labels map[string]string `json:"labels,omitempty"`
	// ReadOnly mounts the container's root filesystem read-only; Tmpfs
	// are memory-backed mounts (writable scratch space).
	ReadOnly bool         `json:"read_only,omitempty"`
	Tmpfs    []TmpfsMount `json:"tmpfs,omitempty"`
	// Restart is what the engine does when the container's process ends:
	// "always" (the default, written ""), "on-failure" (at most
	// RestartMax times when non-zero) or "no".
	Restart    string `json:"restart,omitempty"`
	RestartMax int    `json:"restart_max,omitempty"`
	// Health is checked while the service runs; a container that fails
	// it Retries times in a row is restarted.
	Health *Readiness `json:"health,omitempty"`
	// MilliCPUs limits the container to this many thousandths of a core;
	// with MemoryBytes it is what placement reserves on a machine.
	MilliCPUs uint64 `json:"milli_cpus,omitempty"`
	// Secrets arrive as files in the container (see Secret).
	Secrets []SecretMount `json:"secrets,omitempty"`
	// Standby keeps a copy of the volumes on another machine, for a
	// failover when this one dies.
	Standby *StandbySpec `json:"standby,omitempty"`
	// ImageRef is Image pinned by the deploy: NAME@sha256:... (the digest
	// its registry gave) or sha256:... (the local image's id, for an
	// image that is in no registry). Every machine runs exactly it.
	ImageRef string `json:"image_ref,omitempty"`
}

// RunImage is the reference a machine runs: the pinned one when the
// deploy pinned it.
func (sp ServiceSpec) RunImage() string {
	if sp.ImageRef != "" {
		return sp.ImageRef
	}
	return sp.Image
}

// Service is a service as the store holds it.
type Service struct {
	Namespace  string        `json:"namespace"`
	Spec       ServiceSpec   `json:"spec"`
	Generation uint64        `json:"generation"` // bumped on every spec change
	MachineID  string        `json:"machine_id"` // where it runs
	ServiceIP  netip.Addr    `json:"service_ip"` // never changes
	CreatedAt  time.Time     `json:"created_at"`
	UpdatedAt  time.Time     `json:"updated_at"`
	Status     ServiceStatus `json:"status"` // as its machine last reported
	// StandbyID is the machine that keeps a copy of the volumes (the
	// spec asks for one), Replica the newest copy it holds, LastFailover
	// the last failover.
	StandbyID    string          `json:"standby_id,omitempty"`
	Replica      *Replica        `json:"replica,omitempty"`
	LastFailover *FailoverRecord `json:"last_failover,omitempty"`
}

// ServiceStatus is what the owning machine reports of a service.
type ServiceStatus struct {
	Generation uint64    `json:"generation"` // the generation this status is about
	Ready      bool      `json:"ready"`
	Error      string    `json:"error,omitempty"`
	At         time.Time `json:"at"`
	Process
}

// Process is what the owner saw of the container's process: how often
// it was restarted and how it last ended.
type Process struct {
	// State: "running", "restarting" (the engine waits to restart it),
	// "crash-loop" (restarting, and it ended more than once within the
	// last minutes), "exited" (ended, and its restart policy leaves it
	// so), "unhealthy" (its health check fails); empty: not reported.
	State string `json:"state,omitempty"`
	// Restarts counts the restarts of this container: the engine's after
	// an exit and drover's after failed health checks.
	Restarts int `json:"restarts,omitempty"`
	// LastExit is how the process last ended, if it did.
	LastExit *Exit `json:"last_exit,omitempty"`
}

// Exit is how a container's process ended.
type Exit struct {
	Code   int       `json:"code"`
	At     time.Time `json:"at"`
	Reason string    `json:"reason,omitempty"` // "oom-killed", "unhealthy"
}

// Restart policies.
const (
	RestartAlways    = "always"
	RestartOnFailure = "on-failure"
	RestartNo        = "no"
)

// Process states.
const (
	StateRunning    = "running"
	StateRestarting = "restarting"
	StateCrashLoop  = "crash-loop"
	StateExited     = "exited"
	StateUnhealthy  = "unhealthy"
)

// SetServiceStatus is the owning machine's report on a service. A report
// from another machine, or about an older generation, is refused.
// Result: Service.
type SetServiceStatus struct {
	Namespace  string    `json:"namespace"`
	Name       string    `json:"name"`
	MachineID  string    `json:"machine_id"`
	Generation uint64    `json:"generation"`
	Ready      bool      `json:"ready"`
	Error      string    `json:"error,omitempty"`
	At         time.Time `json:"at"`
	// Process is written only once every machine is at
	// cluster.FactsLevelOperator.
	Process
}

// Type implements Command.
func (SetServiceStatus) Type() CommandType { return CmdSetServiceStatus }

func (s *State) setServiceStatus(c SetServiceStatus) (any, *RuleError) {
	key := c.Namespace + "/" + c.Name
	sv, ok := s.services[key]
	if !ok {
		return nil, ruleErr(ErrUnknownService, "no service %s", key)
	}
	if sv.MachineID != c.MachineID {
		return nil, ruleErr(ErrInvalid, "service %s runs on machine %s, not %s", key, sv.MachineID, c.MachineID)
	}
	if c.Generation != sv.Generation {
		return nil, ruleErr(ErrInvalid, "status of %s is about generation %d, the service is at %d", key, c.Generation, sv.Generation)
	}
	sv.Status = ServiceStatus{Generation: c.Generation, Ready: c.Ready, Error: c.Error, At: c.At, Process: c.Process}
	s.services[key] = sv
	return sv, nil
}

// Key is namespace/name.
func (s Service) Key() string { return s.Namespace + "/" + s.Spec.Name }

// Volume is a ZFS dataset owned by exactly one machine.
type Volume struct {
	Namespace  string    `json:"namespace"`
	Name       string    `json:"name"`
	OwnerID    string    `json:"owner_id"`
	QuotaBytes uint64    `json:"quota_bytes"`
	CreatedAt  time.Time `json:"created_at"`
}

// Key is namespace/name.
func (v Volume) Key() string { return v.Namespace + "/" + v.Name }

// PutService creates or changes a service. Its volumes are created, owned
// by the service's machine, when they do not exist. A new service gets a
// service IP from ServicePrefix. Holder must hold the namespace's lock.
// Result: Service.
type PutService struct {
	Namespace     string       `json:"namespace"`
	Holder        string       `json:"holder"`
	Spec          ServiceSpec  `json:"spec"`
	MachineID     string       `json:"machine_id"`
	ServicePrefix netip.Prefix `json:"service_prefix"`
	At            time.Time    `json:"at"`
	// StandbyID is the machine keeping the standby copy (Spec.Standby).
	StandbyID string `json:"standby_id,omitempty"`
}

// RemoveService removes a service (its volumes stay). Holder must hold the
// namespace's lock. Result: nil.
type RemoveService struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Holder    string    `json:"holder"`
	At        time.Time `json:"at"`
}

// Type implements Command.
func (PutService) Type() CommandType { return CmdPutService }

// Type implements Command.
func (RemoveService) Type() CommandType { return CmdRemoveService }

func (s *State) requireLock(ns, holder string, at time.Time) *RuleError {
	l, ok := s.locks[ns]
	if !ok || l.Holder != holder || !at.Before(l.ExpiresAt) {
		e := ruleErr(ErrLockNotHeld, "namespace %q must be locked by %q for this change", ns, holder)
		if ok {
			e.Holder, e.Since = l.Holder, l.AcquiredAt
		}
		return e
	}
	return nil
}

// ValidateSpec checks a service spec on its own (names, paths, ports).
func ValidateSpec(sp ServiceSpec) error {
	if !ValidName(sp.Name) {
		return fmt.Errorf("service name %q is not a DNS label", sp.Name)
	}
	if sp.Image == "" {
		return fmt.Errorf("service %s: no image", sp.Name)
	}
	seen := map[string]bool{}
	for _, v := range sp.Volumes {
		if !ValidName(v.Name) {
			return fmt.Errorf("service %s: volume name %q is not a DNS label", sp.Name, v.Name)
		}
		if seen[v.Name] {
			return fmt.Errorf("service %s: volume %q listed twice", sp.Name, v.Name)
		}
		seen[v.Name] = true
		if !strings.HasPrefix(v.MountPath, "/") || strings.Contains(v.MountPath, "..") {
			return fmt.Errorf("service %s: volume %s: mount path %q must be absolute and must not contain \"..\"", sp.Name, v.Name, v.MountPath)
		}
	}
	switch sp.Restart {
	case "", RestartAlways, RestartOnFailure, RestartNo:
	default:
		return fmt.Errorf("service %s: restart %q: want always, on-failure or no", sp.Name, sp.Restart)
	}
	if sp.RestartMax < 0 || (sp.RestartMax > 0 && sp.Restart != RestartOnFailure) {
		return fmt.Errorf("service %s: restart_max %d: only with restart = \"on-failure\", and not negative", sp.Name, sp.RestartMax)
	}
	if h := sp.Health; h != nil && (h.Interval <= 0 || h.Timeout <= 0 || h.Retries < 1) {
		return fmt.Errorf("service %s: health check needs a positive interval and timeout and at least 1 retry", sp.Name)
	}
	if err := validateSecretMounts(sp); err != nil {
		return err
	}
	if err := validateStandby(sp); err != nil {
		return err
	}
	if len(sp.Binds) > 0 && sp.Machine == "" {
		return fmt.Errorf("service %s: bind mounts pin a service to a machine: name the machine", sp.Name)
	}
	for _, b := range sp.Binds {
		for _, path := range []string{b.HostPath, b.MountPath} {
			if !strings.HasPrefix(path, "/") || strings.Contains(path, "..") {
				return fmt.Errorf("service %s: bind %s:%s: paths must be absolute and must not contain \"..\"", sp.Name, b.HostPath, b.MountPath)
			}
		}
	}
	ports := map[string]bool{}
	for _, p := range sp.Ports {
		if p.Port < 1 || p.Port > 65535 || p.Target < 1 || p.Target > 65535 || (p.Protocol != "tcp" && p.Protocol != "udp") {
			return fmt.Errorf("service %s: bad port %d->%d/%s", sp.Name, p.Port, p.Target, p.Protocol)
		}
		k := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
		if ports[k] {
			return fmt.Errorf("service %s: port %s listed twice", sp.Name, k)
		}
		ports[k] = true
	}
	return nil
}

func (s *State) putService(c PutService) (any, *RuleError) {
	if err := s.requireLock(c.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	if err := ValidateSpec(c.Spec); err != nil {
		return nil, ruleErr(ErrInvalid, "%v", err)
	}
	m, ok := s.machines[c.MachineID]
	if !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", c.MachineID)
	}
	key := c.Namespace + "/" + c.Spec.Name
	for _, sm := range c.Spec.Secrets {
		if _, ok := s.secrets[c.Namespace+"/"+sm.Name]; !ok {
			return nil, ruleErr(ErrUnknownSecret, "service %s names secret %s, which namespace %s does not have (droverctl secret set %s/%s)", key, sm.Name, c.Namespace, c.Namespace, sm.Name)
		}
	}
	old, exists := s.services[key]
	if exists && old.MachineID != c.MachineID {
		return nil, ruleErr(ErrInvalid, "service %s runs on machine %s: moving it is a migration", key, old.MachineID)
	}
	for _, v := range c.Spec.Volumes {
		if vol, ok := s.volumes[c.Namespace+"/"+v.Name]; ok && vol.OwnerID != c.MachineID {
			return nil, ruleErr(ErrVolumeElsewhere, "volume %s/%s is owned by machine %s, not %s: move it with a migration", c.Namespace, v.Name, vol.OwnerID, m.Name)
		}
		for _, other := range s.services {
			if other.Namespace == c.Namespace && other.Spec.Name != c.Spec.Name {
				for _, ov := range other.Spec.Volumes {
					if ov.Name == v.Name {
						return nil, ruleErr(ErrInvalid, "volume %s/%s is already used by service %s", c.Namespace, v.Name, other.Spec.Name)
					}
				}
			}
		}
	}
	svc := old
	if !exists {
		ip, err := s.freeServiceIP(c.ServicePrefix)
		if err != nil {
			return nil, err
		}
		svc = Service{Namespace: c.Namespace, ServiceIP: ip, MachineID: c.MachineID, CreatedAt: c.At}
	}
	if !exists || !specEqual(old.Spec, c.Spec) {
		svc.Generation++
		svc.UpdatedAt = c.At
	}
	svc.Spec = c.Spec
	if c.Spec.Standby == nil {
		c.StandbyID = ""
	}
	if c.StandbyID != "" {
		if _, ok := s.machines[c.StandbyID]; !ok || c.StandbyID == c.MachineID {
			return nil, ruleErr(ErrInvalid, "service %s: standby %q must be another registered machine", key, c.StandbyID)
		}
	} else if c.Spec.Standby != nil {
		return nil, ruleErr(ErrInvalid, "service %s asks for a standby and names no machine for it", key)
	}
	if svc.StandbyID != c.StandbyID {
		svc.StandbyID, svc.Replica = c.StandbyID, nil
	}
	s.services[key] = svc
	for _, v := range c.Spec.Volumes {
		vk := c.Namespace + "/" + v.Name
		vol, ok := s.volumes[vk]
		if !ok {
			vol = Volume{Namespace: c.Namespace, Name: v.Name, OwnerID: c.MachineID, CreatedAt: c.At}
		}
		vol.QuotaBytes = v.QuotaBytes
		s.volumes[vk] = vol
	}
	return svc, nil
}

func (s *State) freeServiceIP(p netip.Prefix) (netip.Addr, *RuleError) {
	if !p.IsValid() || p != p.Masked() || p.Bits() > p.Addr().BitLen()-2 {
		return netip.Addr{}, ruleErr(ErrInvalid, "service prefix %q is not a network with room for hosts", p)
	}
	held := map[netip.Addr]bool{}
	for _, sv := range s.services {
		held[sv.ServiceIP] = true
	}
	last := lastAddr(p)
	for a := p.Addr().Next(); a.IsValid() && p.Contains(a) && a != last; a = a.Next() {
		if !held[a] {
			return a, nil
		}
	}
	return netip.Addr{}, ruleErr(ErrOverlayExhausted, "no free service IP left in %s", p)
}

func (s *State) removeService(c RemoveService) (any, *RuleError) {
	if err := s.requireLock(c.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	key := c.Namespace + "/" + c.Name
	if _, ok := s.services[key]; !ok {
		return nil, ruleErr(ErrUnknownService, "no service %s", key)
	}
	delete(s.services, key)
	return nil, nil
}

// RemoveVolume forgets a volume whose dataset its owner destroyed. It
// needs the namespace lock's holder, and is refused while a service of
// the namespace mounts the volume or a migration moves one. Result: nil.
type RemoveVolume struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Holder    string    `json:"holder"`
	At        time.Time `json:"at"`
}

// Type implements Command.
func (RemoveVolume) Type() CommandType { return CmdRemoveVolume }

func (s *State) removeVolume(c RemoveVolume) (any, *RuleError) {
	if err := s.requireLock(c.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	key := c.Namespace + "/" + c.Name
	if _, ok := s.volumes[key]; !ok {
		return nil, ruleErr(ErrInvalid, "no volume %s", key)
	}
	for _, sv := range s.services {
		if sv.Namespace != c.Namespace {
			continue
		}
		for _, v := range sv.Spec.Volumes {
			if v.Name == c.Name {
				return nil, ruleErr(ErrInvalid, "volume %s is mounted by service %s", key, sv.Key())
			}
		}
		if m, ok := s.ActiveMigration(sv.Namespace, sv.Spec.Name); ok {
			return nil, ruleErr(ErrInvalid, "migration %s of %s runs", m.ID, sv.Key())
		}
	}
	delete(s.volumes, key)
	return nil, nil
}

// ReservedMilliCPUs sums the CPU limits of the services a machine owns
// or that a migration moves to it: what placement counts as taken.
func (s *State) ReservedMilliCPUs(machineID string) uint64 {
	var sum uint64
	for _, sv := range s.services {
		m, moving := s.ActiveMigration(sv.Namespace, sv.Spec.Name)
		if sv.MachineID == machineID || (moving && m.TargetID == machineID) {
			sum += sv.Spec.MilliCPUs
		}
	}
	return sum
}

// Services lists the services, sorted by namespace/name.
func (s *State) Services() []Service { return sortedValues(s.services, Service.Key) }

// ServiceIPsOf lists the service IPs of the services machineID owns,
// which only it may hold.
func (s *State) ServiceIPsOf(machineID string) []netip.Addr {
	var ips []netip.Addr
	for _, sv := range s.Services() {
		if sv.MachineID == machineID {
			ips = append(ips, sv.ServiceIP)
		}
	}
	return ips
}

// Service looks a service up.
func (s *State) Service(namespace, name string) (Service, bool) {
	sv, ok := s.services[namespace+"/"+name]
	return sv, ok
}

// Volumes lists the volumes, sorted by namespace/name.
func (s *State) Volumes() []Volume { return sortedValues(s.volumes, Volume.Key) }

// Volume looks a volume up.
func (s *State) Volume(namespace, name string) (Volume, bool) {
	v, ok := s.volumes[namespace+"/"+name]
	return v, ok
}

// specEqual compares specs by their wire form (maps encode sorted).
func specEqual(a, b ServiceSpec) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}
