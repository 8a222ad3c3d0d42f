// Package reconcile makes a machine run exactly what the facts say it
// owns: containers, the service IPs on its loopback, and the capacity it
// gossips. See DESIGN.md.
package reconcile

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	goruntime "runtime"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/volume"
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
	CaughtUp(ctx context.Context) error
}

// Runtime runs containers.
type Runtime interface {
	List(ctx context.Context) ([]runtime.Container, error)
	Start(ctx context.Context, r runtime.RunSpec) (runtime.Container, error)
	Remove(ctx context.Context, id string, grace time.Duration) error
	// EnsureImage pulls an image the engine lacks (progress may be nil).
	EnsureImage(ctx context.Context, ref string, progress func(runtime.PullProgress)) error
	CheckOnce(ctx context.Context, c runtime.Container, r runtime.RunSpec) error
}

// Restarter restarts a container in place (an unhealthy one).
type Restarter interface {
	Stop(ctx context.Context, id string, grace time.Duration) (runtime.Stopped, error)
	Restart(ctx context.Context, id string) error
}

// Engine is the container engine as the reconciler uses it.
type Engine interface {
	Runtime
	Restarter
}

// Volumes makes a service's volumes and tells the free pool space.
type Volumes interface {
	Ensure(namespace, name string, p volume.Properties) (volume.Info, error)
	FreeBytes() (uint64, error)
}

// Loopback holds the service IPs of this machine.
type Loopback interface {
	Set(want []netip.Addr) error
}

// Gossip carries this machine's capacity to the others.
type Gossip interface {
	LocalMeta() cluster.Meta
	SetMeta(update func(*cluster.Meta)) error
	// Member tells the facts level others gossip.
	Member(id string) (cluster.Member, bool)
}

// Config is what the reconciler needs to know of its machine.
type Config struct {
	Self     string        // this machine's id
	Interval time.Duration // between rounds (2 s when zero)
	Logger   *slog.Logger
	// Observer, when set, is told what the reconciler did and when a
	// round failed.
	Observer Observer
	// MemAvailable reports free memory (capacity).
	MemAvailable func() uint64
	// Fence, when set, says which services may not run here now: a
	// service with a standby on a machine whose lease does not hold.
	Fence Fence
	// Busy, when set, tells which services another part of this machine
	// acts on now (a restart): the reconciler leaves them alone.
	Busy func(service string) bool
}

// Fence keeps a service from running where it may have been failed over.
type Fence interface {
	Fenced(sv fsm.Service) bool
}

// Observer counts the reconciler's work (agent/metrics).
type Observer interface {
	ReconcileAction(action string)
	ReconcileError()
}

// Reconciler turns facts into containers on this machine.
type Reconciler struct {
	cfg    Config
	facts  Facts
	rt     Engine
	vols   Volumes // nil: this machine holds no volumes
	lo     Loopback
	gossip Gossip
	log    *slog.Logger

	checks map[string]*checkState // by service key; only the loop touches it
}

// checkState is the reconciler's memory of one service's readiness and
// health.
type checkState struct {
	generation  uint64
	containerID string
	failures    int
	reported    string // "ready" or the error last reported for generation
	// reportedProc is the process last reported, and when.
	reportedProc fsm.Process
	reportedAt   time.Time
	health       healthState
}

// healthState is what the health checks of one service have seen.
type healthState struct {
	checkedAt time.Time
	failures  int       // in a row
	restarts  int       // drover's restarts of an unhealthy container
	lastAt    time.Time // drover's last such restart
}

// New makes a reconciler; vols is nil on a machine without volumes.
func New(cfg Config, facts Facts, rt Engine, vols Volumes, lo Loopback, gossip Gossip) *Reconciler {
	if cfg.Interval == 0 {
		cfg.Interval = 2 * time.Second
	}
	if cfg.MemAvailable == nil {
		cfg.MemAvailable = func() uint64 { return 0 }
	}
	return &Reconciler{cfg: cfg, facts: facts, rt: rt, vols: vols, lo: lo, gossip: gossip, log: cfg.Logger, checks: map[string]*checkState{}}
}

// Run reconciles every interval until ctx ends, once the facts have
// caught up with the leader's: an empty store after a restart would
// otherwise read as "own nothing" and stop workloads.
func (r *Reconciler) Run(ctx context.Context) {
	tick := time.NewTicker(r.cfg.Interval)
	defer tick.Stop()
	if !factview.WaitCaughtUp(ctx, r.facts, tick.C, r.log, "workloads") {
		return
	}
	r.log.Info("fact store caught up: reconciling workloads")
	lastCapacity := time.Time{}
	for {
		if time.Since(lastCapacity) > 30*time.Second {
			r.ReportCapacity()
			lastCapacity = time.Now()
		}
		if err := r.Reconcile(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("reconciling workloads", "err", err)
			r.observe(func(o Observer) { o.ReconcileError() })
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// capacityStep rounds capacity so small changes do not churn the facts.
const capacityStep = 256 << 20

// ReportCapacity gossips free memory and volume space, rounded.
func (r *Reconciler) ReportCapacity() {
	mem := r.cfg.MemAvailable() / capacityStep * capacityStep
	var disk uint64
	if r.vols != nil {
		if free, err := r.vols.FreeBytes(); err == nil {
			disk = free / capacityStep * capacityStep
		}
	}
	cores := uint64(goruntime.NumCPU()) * 1000
	if m := r.gossip.LocalMeta(); m.MemoryBytes == mem && m.DiskBytes == disk && m.MilliCPUs == cores {
		return
	}
	if err := r.gossip.SetMeta(func(m *cluster.Meta) { m.MemoryBytes, m.DiskBytes, m.MilliCPUs = mem, disk, cores }); err != nil {
		r.log.Warn("gossiping capacity", "err", err)
	}
}

// desired is what the facts ask of this machine.
type desired struct {
	owned   []fsm.Service
	volumes map[string]fsm.Volume
	// moving: services a migration to or from this machine moves; they
	// are the migration's, not the reconciler's.
	moving map[string]bool
	// ips: the service IPs this machine holds: those it owns, and no
	// other (a service moving here gets its IP at the commit).
	ips []netip.Addr
}

// desire reads what the facts ask of machine self: a pure function.
func desire(s *fsm.State, self string) desired {
	d := desired{volumes: map[string]fsm.Volume{}, moving: map[string]bool{}}
	for _, sv := range s.Services() {
		if m, ok := s.ActiveMigration(sv.Namespace, sv.Spec.Name); ok && (m.SourceID == self || m.TargetID == self) {
			d.moving[sv.Key()] = true
		}
		if sv.MachineID == self {
			d.owned = append(d.owned, sv)
		}
	}
	for _, v := range s.Volumes() {
		d.volumes[v.Key()] = v
	}
	d.ips = s.ServiceIPsOf(self)
	return d
}

// Reconcile makes this machine run exactly the services it owns: it
// starts what is missing, re-creates what changed, adopts what already
// runs as asked (without restarting it), removes what it no longer owns,
// and reports readiness through the fact store. It never starts a service
// whose volume another machine owns.
func (r *Reconciler) Reconcile(ctx context.Context) error {
	var d desired
	r.facts.Read(func(s *fsm.State) { d = desire(s, r.cfg.Self) })
	containers, err := r.rt.List(ctx)
	if err != nil {
		return err
	}
	byKey := map[string]runtime.Container{}
	for _, c := range containers {
		byKey[c.Key()] = c
	}
	if err := r.lo.Set(d.ips); err != nil {
		return err
	}
	wanted := map[string]bool{}
	for _, sv := range d.owned {
		wanted[sv.Key()] = true
		if !d.moving[sv.Key()] && (r.cfg.Busy == nil || !r.cfg.Busy(sv.Key())) {
			r.service(ctx, sv, d.volumes, byKey[sv.Key()])
		}
	}
	for _, c := range containers {
		if !wanted[c.Key()] && !d.moving[c.Key()] {
			r.log.Info("removing a container this machine no longer owns", "service", c.Key())
			r.observe(func(o Observer) { o.ReconcileAction("remove") })
			if err := r.rt.Remove(ctx, c.ID, 0); err != nil {
				r.log.Warn("removing container", "service", c.Key(), "err", err)
			}
			delete(r.checks, c.Key())
		}
	}
	return nil
}

// service brings one owned service in line: its container runs the spec
// of its generation, and its readiness is reported.
func (r *Reconciler) service(ctx context.Context, sv fsm.Service, volumes map[string]fsm.Volume, c runtime.Container) {
	key := sv.Key()
	st := r.checks[key]
	if st == nil || st.generation != sv.Generation {
		st = &checkState{generation: sv.Generation}
		if sv.Status.Generation == sv.Generation {
			if sv.Status.Ready {
				st.reported = "ready"
			} else {
				st.reported = sv.Status.Error
			}
			st.reportedProc, st.reportedAt = sv.Status.Process, sv.Status.At
		}
		r.checks[key] = st
	}
	if r.cfg.Fence != nil && r.cfg.Fence.Fenced(sv) {
		// Its lease does not hold: the fence stops it; nothing starts it.
		return
	}
	rs, err := r.runSpec(sv, volumes)
	if err != nil {
		r.report(ctx, sv, st, err)
		return
	}
	if c.ID == "" || c.SpecHash != rs.Hash() || (!c.Running && !engineKeeps(c, rs.Spec)) {
		// The image first: a container being replaced serves on while
		// its successor's image is pulled.
		if err := r.rt.EnsureImage(ctx, rs.Spec.RunImage(), nil); err != nil {
			r.report(ctx, sv, st, err)
			return
		}
		if c.ID != "" {
			r.log.Info("re-creating container", "service", key, "generation", sv.Generation)
			r.observe(func(o Observer) { o.ReconcileAction("recreate") })
			if err := r.rt.Remove(ctx, c.ID, 0); err != nil {
				r.report(ctx, sv, st, err)
				return
			}
		}
		started, err := r.rt.Start(ctx, rs)
		if err != nil {
			r.report(ctx, sv, st, err)
			return
		}
		r.log.Info("started container", "service", key, "generation", sv.Generation)
		r.observe(func(o Observer) { o.ReconcileAction("start") })
		c = started
		st.failures, st.containerID, st.reported, st.health = 0, c.ID, "", healthState{}
	}
	if st.containerID != c.ID && st.containerID != "" {
		st.health = healthState{} // another container (a move brought it)
	}
	if st.reported == "ready" && st.containerID == "" {
		st.containerID = c.ID // adopted: ready as reported before
	}
	proc := processOf(c, rs.Spec, st.health, time.Now())
	if !c.Running {
		// The engine restarts it, or its policy leaves it ended.
		r.reportProcess(ctx, sv, st, notRunning(proc), proc)
		return
	}
	if st.reported == "ready" {
		if r.checkHealth(ctx, sv, st, c, rs) {
			return // restarted: readiness is checked again next round
		}
		r.reportProcess(ctx, sv, st, nil, processOf(c, rs.Spec, st.health, time.Now()))
		return
	}
	if neverReady(c, rs.Spec, time.Now()) && r.checkHealth(ctx, sv, st, c, rs) {
		return // it never got ready and is unhealthy: restarted
	}
	rd := rs.Spec.Readiness
	retries := 30
	if rd != nil {
		retries = rd.Retries
		if !c.StartedAt.IsZero() && time.Since(c.StartedAt) < rd.StartPeriod {
			return
		}
	}
	if err := r.rt.CheckOnce(ctx, c, rs); err != nil {
		st.failures++
		if st.failures > retries {
			r.reportProcess(ctx, sv, st, err, proc)
		}
		return
	}
	r.reportProcess(ctx, sv, st, nil, proc)
}

// neverReady tells whether a running container has had the whole of its
// readiness check's budget (start period, then every retry) without
// becoming ready: from then on its health check runs too, so a process
// that hangs before it is ever ready is restarted like one that hangs
// after.
func neverReady(c runtime.Container, spec fsm.ServiceSpec, now time.Time) bool {
	if spec.Health == nil || c.StartedAt.IsZero() {
		return false
	}
	budget := 60 * time.Second // no readiness check: running is ready, so this is rarely reached
	if rd := spec.Readiness; rd != nil {
		budget = rd.StartPeriod + time.Duration(rd.Retries+1)*rd.Interval
	}
	return now.Sub(c.StartedAt) > budget
}

// engineKeeps tells whether a container that does not run is the
// engine's to restart (it is restarting) or left ended by its restart
// policy — not the reconciler's to start again.
func engineKeeps(c runtime.Container, spec fsm.ServiceSpec) bool {
	switch {
	case c.State == "restarting":
		return true
	case c.State != "exited" || c.LastExit == nil:
		return false // created, or stopped by someone: drover starts it
	case spec.Restart == fsm.RestartNo:
		return true
	case spec.Restart == fsm.RestartOnFailure:
		return c.LastExit.Code == 0 || (spec.RestartMax > 0 && c.Restarts >= spec.RestartMax)
	}
	return false
}

// crashLoopRestarts is how many restarts, the last exit within
// crashLoopWindow, make a crash loop.
const (
	crashLoopRestarts = 3
	crashLoopWindow   = 5 * time.Minute
)

// processOf is what is reported of a container's process: a pure
// function of what the engine and the health checks saw.
func processOf(c runtime.Container, spec fsm.ServiceSpec, h healthState, now time.Time) fsm.Process {
	p := fsm.Process{Restarts: c.Restarts + h.restarts, LastExit: c.LastExit}
	if p.LastExit != nil && !h.lastAt.IsZero() && !p.LastExit.At.Before(h.lastAt.Add(-time.Second)) &&
		p.LastExit.At.Before(h.lastAt.Add(runtime.StopGrace(spec)+5*time.Second)) {
		exit := *p.LastExit
		exit.Reason = fsm.StateUnhealthy // drover stopped it
		p.LastExit = &exit
	}
	looping := c.Restarts >= crashLoopRestarts && c.LastExit != nil && now.Sub(c.LastExit.At) < crashLoopWindow
	switch {
	case c.State == "restarting" && looping:
		p.State = fsm.StateCrashLoop
	case c.State == "restarting":
		p.State = fsm.StateRestarting
	case !c.Running && spec.Restart == fsm.RestartOnFailure && spec.RestartMax > 0 && c.Restarts >= spec.RestartMax && c.LastExit != nil && c.LastExit.Code != 0:
		p.State = fsm.StateCrashLoop // gave up
	case !c.Running:
		p.State = fsm.StateExited
	case h.failures > 0:
		p.State = fsm.StateUnhealthy
	case looping:
		p.State = fsm.StateCrashLoop
	default:
		p.State = fsm.StateRunning
	}
	return p
}

// notRunning is the error reported for a container that does not run.
func notRunning(p fsm.Process) error {
	what := "exited"
	switch p.State {
	case fsm.StateCrashLoop:
		what = "keeps exiting: last"
	case fsm.StateRestarting:
		what = "restarting: exited"
	}
	if p.LastExit == nil {
		return fmt.Errorf("%s (not started)", what)
	}
	return fmt.Errorf("%s with code %d at %s", what, p.LastExit.Code, p.LastExit.At.UTC().Format(time.RFC3339))
}

// checkHealth runs the service's health check when it is due, and
// restarts the container once it failed Retries times in a row. It
// tells whether it restarted.
func (r *Reconciler) checkHealth(ctx context.Context, sv fsm.Service, st *checkState, c runtime.Container, rs runtime.RunSpec) bool {
	hc := rs.Spec.Health
	now := time.Now()
	if hc == nil || now.Sub(st.health.checkedAt) < hc.Interval || (!c.StartedAt.IsZero() && now.Sub(c.StartedAt) < hc.StartPeriod) {
		return false
	}
	st.health.checkedAt = now
	check := rs
	check.Spec.Readiness = hc
	err := r.rt.CheckOnce(ctx, c, check)
	if err == nil {
		st.health.failures = 0
		return false
	}
	st.health.failures++
	r.log.Warn("health check failed", "service", sv.Key(), "failures", st.health.failures, "of", hc.Retries, "err", err)
	if st.health.failures < hc.Retries {
		return false
	}
	r.log.Warn("restarting an unhealthy container", "service", sv.Key(), "after", st.health.failures)
	r.observe(func(o Observer) { o.ReconcileAction("restart-unhealthy") })
	st.health.failures, st.health.lastAt = 0, time.Now()
	st.health.restarts++
	if _, err := r.rt.Stop(ctx, c.ID, runtime.StopGrace(rs.Spec)); err != nil {
		r.log.Warn("stopping an unhealthy container", "service", sv.Key(), "err", err)
	}
	if err := r.rt.Restart(ctx, c.ID); err != nil {
		r.log.Warn("starting an unhealthy container again", "service", sv.Key(), "err", err)
	}
	st.failures, st.reported = 0, "" // readiness is checked again
	return true
}

// reportProcess reports readiness (err nil) or failure with what is
// known of the process, when either changed: a change of the restart
// count alone at most every processReportEvery.
func (r *Reconciler) reportProcess(ctx context.Context, sv fsm.Service, st *checkState, err error, proc fsm.Process) {
	if ok, _ := factview.FactsAt(r.facts, r.gossip, cluster.FactsLevelOperator); !ok {
		proc = fsm.Process{} // a machine would not read it
	}
	outcome := "ready"
	if err != nil {
		outcome = err.Error()
	}
	same := st.reported == outcome && st.reportedProc.State == proc.State && exitAt(st.reportedProc) == exitAt(proc)
	if same && (st.reportedProc.Restarts == proc.Restarts || time.Since(st.reportedAt) < processReportEvery) {
		return
	}
	r.write(ctx, sv, st, err, proc)
}

// processReportEvery bounds how often a crash loop's restart count
// alone is written to the facts.
const processReportEvery = 10 * time.Second

func exitAt(p fsm.Process) time.Time {
	if p.LastExit == nil {
		return time.Time{}
	}
	return p.LastExit.At
}

// runSpec resolves a service's volumes to datasets this machine owns.
func (r *Reconciler) runSpec(sv fsm.Service, volumes map[string]fsm.Volume) (runtime.RunSpec, error) {
	rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP, Mounts: map[string]string{}}
	for _, vm := range sv.Spec.Volumes {
		v, ok := volumes[sv.Namespace+"/"+vm.Name]
		if !ok || v.OwnerID != r.cfg.Self {
			return rs, fmt.Errorf("volume %s/%s is not owned by this machine: not starting %s", sv.Namespace, vm.Name, sv.Key())
		}
		if r.vols == nil {
			return rs, fmt.Errorf("this machine has no ZFS parent dataset (--zfs-parent): cannot hold volume %s/%s", sv.Namespace, vm.Name)
		}
		info, err := r.vols.Ensure(sv.Namespace, vm.Name, volume.Properties{Quota: vm.QuotaBytes, RecordSize: vm.RecordSize, Compression: vm.Compression})
		if err != nil {
			return rs, err
		}
		rs.Mounts[vm.Name] = info.Mountpoint
	}
	return rs, nil
}

// report writes a service's readiness (err nil) or failure to the facts,
// once per generation and outcome.
func (r *Reconciler) report(ctx context.Context, sv fsm.Service, st *checkState, err error) {
	outcome := "ready"
	if err != nil {
		outcome = err.Error()
	}
	if st.reported == outcome {
		return
	}
	r.write(ctx, sv, st, err, st.reportedProc)
}

// write writes a service's status to the facts.
func (r *Reconciler) write(ctx context.Context, sv fsm.Service, st *checkState, err error, proc fsm.Process) {
	outcome := "ready"
	if err != nil {
		outcome = err.Error()
		if st.reported != outcome {
			r.log.Warn("service failed", "service", sv.Key(), "generation", sv.Generation, "err", err)
		}
	}
	cmd := fsm.SetServiceStatus{Namespace: sv.Namespace, Name: sv.Spec.Name, MachineID: r.cfg.Self,
		Generation: sv.Generation, Ready: err == nil, Error: errString(err), At: time.Now(), Process: proc}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, aerr := r.facts.Apply(actx, cmd); aerr != nil {
		r.log.Warn("reporting service status", "service", sv.Key(), "err", aerr)
		return
	}
	st.reported, st.reportedProc, st.reportedAt = outcome, proc, time.Now()
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// observe tells the observer, if there is one.
func (r *Reconciler) observe(fn func(Observer)) {
	if r.cfg.Observer != nil {
		fn(r.cfg.Observer)
	}
}
