package reconcile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
	"github.com/drover-sh/drover/volume"
)

type fakeRuntime struct {
	mu       sync.Mutex
	byID     map[string]runtime.Container
	next     int
	started  []string
	removed  []string
	checkErr error
	pulled   []string
	pullErr  error // EnsureImage fails with it when set
	// healthErr is what health checks (not readiness) return; stops and
	// restarts are the health restarts done.
	healthErr error
	stops     []string
	restarts  []string
}

func (r *fakeRuntime) Stop(_ context.Context, id string, _ time.Duration) (runtime.Stopped, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stops = append(r.stops, id)
	c := r.byID[id]
	c.Running, c.State = false, "exited"
	c.LastExit = &fsm.Exit{Code: 143, At: time.Now()}
	r.byID[id] = c
	return runtime.Stopped{}, nil
}

func (r *fakeRuntime) Restart(_ context.Context, id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.restarts = append(r.restarts, id)
	c := r.byID[id]
	c.Running, c.State, c.StartedAt = true, "running", time.Now()
	r.byID[id] = c
	return nil
}

// set changes the one container of a service as the engine would.
func (r *fakeRuntime) set(key string, change func(*runtime.Container)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, c := range r.byID {
		if c.Key() == key {
			change(&c)
			r.byID[id] = c
		}
	}
}

func (r *fakeRuntime) EnsureImage(_ context.Context, ref string, _ func(runtime.PullProgress)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pulled = append(r.pulled, ref)
	return r.pullErr
}

func (r *fakeRuntime) List(context.Context) ([]runtime.Container, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []runtime.Container
	for _, c := range r.byID {
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b runtime.Container) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

func (r *fakeRuntime) Start(_ context.Context, rs runtime.RunSpec) (runtime.Container, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.next++
	c := runtime.Container{ID: fmt.Sprintf("c%d", r.next), Namespace: rs.Namespace, Service: rs.Spec.Name, Generation: rs.Generation, SpecHash: rs.Hash(), Running: true}
	r.byID[c.ID] = c
	r.started = append(r.started, rs.Namespace+"/"+rs.Spec.Name)
	return c, nil
}

func (r *fakeRuntime) Remove(_ context.Context, id string, _ time.Duration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.removed = append(r.removed, r.byID[id].Key())
	delete(r.byID, id)
	return nil
}

func (r *fakeRuntime) CheckOnce(_ context.Context, _ runtime.Container, rs runtime.RunSpec) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rs.Spec.Health != nil && rs.Spec.Readiness == rs.Spec.Health {
		return r.healthErr
	}
	return r.checkErr
}

type fakeVolumes struct{ ensured []string }

func (v *fakeVolumes) Ensure(ns, name string, p volume.Properties) (volume.Info, error) {
	v.ensured = append(v.ensured, fmt.Sprintf("%s/%s:%d", ns, name, p.Quota))
	return volume.Info{Mountpoint: "/pool/" + ns + "/" + name}, nil
}
func (v *fakeVolumes) FreeBytes() (uint64, error) { return 3<<30 + 12345, nil }

type fakeLoopback struct{ ips []netip.Addr }

func (l *fakeLoopback) Set(want []netip.Addr) error {
	l.ips = slices.Clone(want)
	slices.SortFunc(l.ips, netip.Addr.Compare)
	return nil
}

type fakeGossip struct {
	meta cluster.Meta
	sets int
}

func (g *fakeGossip) LocalMeta() cluster.Meta { return g.meta }
func (g *fakeGossip) Member(id string) (cluster.Member, bool) {
	return cluster.Member{Meta: cluster.Meta{MachineID: id, Facts: cluster.FactsLevel}}, true
}
func (g *fakeGossip) SetMeta(update func(*cluster.Meta)) error {
	update(&g.meta)
	g.sets++
	return nil
}

type rig struct {
	facts *facttest.Store
	rt    *fakeRuntime
	vols  *fakeVolumes
	lo    *fakeLoopback
	gos   *fakeGossip
	r     *Reconciler
}

func newRig(t *testing.T, withVolumes bool) *rig {
	g := &rig{facts: facttest.NewStore(), rt: &fakeRuntime{byID: map[string]runtime.Container{}}, vols: &fakeVolumes{}, lo: &fakeLoopback{}, gos: &fakeGossip{}}
	g.facts.AddMachine(t, "a", "a")
	g.facts.AddMachine(t, "b", "b")
	var vols Volumes
	if withVolumes {
		vols = g.vols
	}
	g.r = New(Config{Self: "a", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), MemAvailable: func() uint64 { return 1<<30 + 999 }}, g.facts, g.rt, vols, g.lo, g.gos)
	return g
}

func spec(name string, volumes ...string) fsm.ServiceSpec {
	sp := fsm.ServiceSpec{Name: name, Image: "img:1", Readiness: &fsm.Readiness{Kind: "tcp", Port: 80, Retries: 1}}
	for _, v := range volumes {
		sp.Volumes = append(sp.Volumes, fsm.VolumeMount{Name: v, MountPath: "/" + v, QuotaBytes: 1 << 20})
	}
	return sp
}

func (g *rig) status(t *testing.T, name string) fsm.ServiceStatus {
	var sv fsm.Service
	g.facts.Read(func(s *fsm.State) { sv, _ = s.Service("shop", name) })
	return sv.Status
}

func (g *rig) round(t *testing.T) {
	t.Helper()
	if err := g.r.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func statusCommands(st *facttest.Store) int {
	n := 0
	for _, c := range st.Applied() {
		if c.Type() == fsm.CmdSetServiceStatus {
			n++
		}
	}
	return n
}

func TestReconcileStartsWhatItOwnsAndReportsReadyOnce(t *testing.T) {
	g := newRig(t, true)
	web := g.facts.Deploy(t, "shop", spec("web", "data"), "a")
	other := g.facts.Deploy(t, "shop", spec("api"), "b")
	g.round(t)
	if !slices.Equal(g.rt.started, []string{"shop/web"}) || !slices.Equal(g.vols.ensured, []string{"shop/data:1048576"}) {
		t.Fatalf("started %v, ensured %v", g.rt.started, g.vols.ensured)
	}
	if st := g.status(t, "web"); !st.Ready || st.Generation != web.Generation {
		t.Fatalf("status %+v", st)
	}
	if !slices.Equal(g.lo.ips, []netip.Addr{web.ServiceIP}) {
		t.Fatalf("loopback %v, want only %s (not %s)", g.lo.ips, web.ServiceIP, other.ServiceIP)
	}
	g.round(t)
	if len(g.rt.started) != 1 || statusCommands(g.facts) != 1 {
		t.Fatalf("a second round started %v and reported %d times", g.rt.started, statusCommands(g.facts))
	}
}

func TestReconcileAdoptsARunningContainerAndRecreatesAChangedOne(t *testing.T) {
	g := newRig(t, true)
	g.facts.Deploy(t, "shop", spec("web", "data"), "a")
	g.round(t)
	// A daemon restart: a new reconciler finds the container running as asked.
	g.r = New(g.r.cfg, g.facts, g.rt, g.vols, g.lo, g.gos)
	g.round(t)
	if len(g.rt.started) != 1 || len(g.rt.removed) != 0 {
		t.Fatalf("restart touched the workload: started %v removed %v", g.rt.started, g.rt.removed)
	}
	changed := spec("web", "data")
	changed.Env = map[string]string{"A": "1"}
	sv := g.facts.Deploy(t, "shop", changed, "a")
	g.round(t)
	if len(g.rt.started) != 2 || !slices.Equal(g.rt.removed, []string{"shop/web"}) {
		t.Fatalf("a new generation: started %v removed %v", g.rt.started, g.rt.removed)
	}
	if st := g.status(t, "web"); !st.Ready || st.Generation != sv.Generation || sv.Generation != 2 {
		t.Fatalf("status %+v of generation %d", st, sv.Generation)
	}
}

func TestReconcileRemovesWhatItNoLongerOwnsButNotWhatMoves(t *testing.T) {
	g := newRig(t, true)
	web := g.facts.Deploy(t, "shop", spec("web", "data"), "a")
	api := g.facts.Deploy(t, "shop", spec("api"), "a")
	g.round(t)
	// api moves to b: while the migration runs it is the migration's.
	g.facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "m", Lease: time.Hour, At: time.Now()})
	g.facts.Must(t, fsm.StartMigration{ID: "m1", Namespace: "shop", Service: "api", TargetID: "b", Holder: "m", At: time.Now()})
	for _, p := range []fsm.MigrationPhase{fsm.PhaseWarmCopy, fsm.PhaseSourceStopped, fsm.PhaseFinalCopy, fsm.PhaseTargetStarting} {
		g.facts.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: p, At: time.Now()})
	}
	g.rt.mu.Lock()
	for id, c := range g.rt.byID {
		if c.Service == "api" {
			c.Running = false // the source stopped it
			g.rt.byID[id] = c
		}
	}
	g.rt.mu.Unlock()
	g.round(t)
	if len(g.rt.removed) != 0 || len(g.rt.started) != 2 {
		t.Fatalf("the reconciler touched a moving service: started %v removed %v", g.rt.started, g.rt.removed)
	}
	g.facts.Must(t, fsm.CommitMigration{ID: "m1", Holder: "m", ReadyAt: time.Now(), At: time.Now()})
	g.facts.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseDone, At: time.Now()})
	g.round(t)
	if !slices.Equal(g.rt.removed, []string{"shop/api"}) || !slices.Equal(g.lo.ips, []netip.Addr{web.ServiceIP}) {
		t.Fatalf("after the move: removed %v, loopback %v (api had %s)", g.rt.removed, g.lo.ips, api.ServiceIP)
	}
}

func TestReconcileReportsWhyAServiceCannotRun(t *testing.T) {
	g := newRig(t, false)
	g.facts.Deploy(t, "shop", spec("web", "data"), "a")
	g.facts.Deploy(t, "shop", spec("api"), "a")
	g.rt.checkErr = errors.New("dial tcp: connection refused")
	for range 3 {
		g.round(t)
	}
	if st := g.status(t, "web"); st.Ready || !strings.Contains(st.Error, "no ZFS parent") {
		t.Fatalf("web status %+v: want the missing ZFS parent named", st)
	}
	if st := g.status(t, "api"); st.Ready || !strings.Contains(st.Error, "connection refused") {
		t.Fatalf("api status %+v: want the failed check after its retries", st)
	}
	if slices.Contains(g.rt.started, "shop/web") {
		t.Fatal("started a service whose volume this machine cannot hold")
	}
}

func TestCapacityIsRoundedAndGossipedOnChange(t *testing.T) {
	g := newRig(t, true)
	g.r.ReportCapacity()
	g.r.ReportCapacity()
	if g.gos.meta.MemoryBytes != 1<<30 || g.gos.meta.DiskBytes != 3<<30 || g.gos.sets != 1 {
		t.Fatalf("capacity %d/%d set %d times", g.gos.meta.MemoryBytes, g.gos.meta.DiskBytes, g.gos.sets)
	}
}

func TestRunStopsWithItsContext(t *testing.T) {
	g := newRig(t, true)
	g.r.cfg.Interval = 10 * time.Millisecond
	g.facts.Deploy(t, "shop", spec("web"), "a")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); g.r.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for !g.status(t, "web").Ready && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if !g.status(t, "web").Ready {
		t.Fatal("Run never reconciled")
	}
}

// The pinned image is pulled before anything is started or replaced; a
// pull that fails leaves the running container alone and is reported.
func TestReconcilePullsThePinnedImageBeforeReplacing(t *testing.T) {
	g := newRig(t, true)
	sp := spec("web", "data")
	sp.ImageRef = "reg.example:5000/img@sha256:1111"
	g.facts.Deploy(t, "shop", sp, "a")
	g.round(t)
	if !slices.Equal(g.rt.pulled, []string{"reg.example:5000/img@sha256:1111"}) || len(g.rt.started) != 1 {
		t.Fatalf("pulled %v, started %v", g.rt.pulled, g.rt.started)
	}
	g.rt.pullErr = errors.New("image pull failed: unauthorized")
	sp.ImageRef = "reg.example:5000/img@sha256:2222"
	g.facts.Deploy(t, "shop", sp, "a")
	g.round(t)
	if len(g.rt.removed) != 0 || len(g.rt.started) != 1 {
		t.Fatalf("a failed pull replaced the container: removed %v started %v", g.rt.removed, g.rt.started)
	}
	if st := g.status(t, "web"); st.Ready || !strings.Contains(st.Error, "unauthorized") {
		t.Fatalf("status %+v does not say why", st)
	}
}

func TestACrashLoopIsReportedAndLeftToTheEngine(t *testing.T) {
	g := newRig(t, false)
	g.facts.Deploy(t, "shop", spec("web"), "a")
	g.round(t)
	exited := time.Now().Add(-time.Second)
	g.rt.set("shop/web", func(c *runtime.Container) {
		c.Running, c.State, c.Restarts = false, "restarting", 4
		c.LastExit = &fsm.Exit{Code: 3, At: exited}
	})
	g.round(t)
	st := g.status(t, "web")
	if st.Ready || st.State != fsm.StateCrashLoop || st.Restarts != 4 || st.LastExit == nil || st.LastExit.Code != 3 ||
		!strings.Contains(st.Error, "keeps exiting: last with code 3") {
		t.Fatalf("status %+v", st)
	}
	if len(g.rt.removed) != 0 || len(g.rt.started) != 1 {
		t.Fatalf("the reconciler took the engine's restart: removed %v started %v", g.rt.removed, g.rt.started)
	}
	// The next restart alone is not written at once.
	g.rt.set("shop/web", func(c *runtime.Container) { c.Restarts = 5 })
	g.round(t)
	if st := g.status(t, "web"); st.Restarts != 4 {
		t.Fatalf("a restart count alone was written within %s: %+v", processReportEvery, st)
	}
}

func TestRestartPolicyDecidesWhetherAnEndedContainerStartsAgain(t *testing.T) {
	exit := func(code int) *fsm.Exit { return &fsm.Exit{Code: code, At: time.Now()} }
	cases := []struct {
		name    string
		restart string
		max     int
		c       runtime.Container
		keeps   bool
		state   string
	}{
		{"always, stopped by someone", "", 0, runtime.Container{State: "exited", LastExit: exit(0)}, false, fsm.StateExited},
		{"always, restarting", "", 0, runtime.Container{State: "restarting", LastExit: exit(1), Restarts: 1}, true, fsm.StateRestarting},
		{"no", fsm.RestartNo, 0, runtime.Container{State: "exited", LastExit: exit(1)}, true, fsm.StateExited},
		{"on-failure, done", fsm.RestartOnFailure, 0, runtime.Container{State: "exited", LastExit: exit(0)}, true, fsm.StateExited},
		{"on-failure, gave up", fsm.RestartOnFailure, 3, runtime.Container{State: "exited", LastExit: exit(2), Restarts: 3}, true, fsm.StateCrashLoop},
		{"on-failure, stopped early", fsm.RestartOnFailure, 3, runtime.Container{State: "exited", LastExit: exit(2), Restarts: 1}, false, fsm.StateExited},
		{"never started", "", 0, runtime.Container{State: "created"}, false, fsm.StateExited},
	}
	for _, c := range cases {
		sp := fsm.ServiceSpec{Restart: c.restart, RestartMax: c.max}
		if got := engineKeeps(c.c, sp); got != c.keeps {
			t.Errorf("%s: engine keeps %v, want %v", c.name, got, c.keeps)
		}
		if got := processOf(c.c, sp, healthState{}, time.Now()); got.State != c.state {
			t.Errorf("%s: state %q, want %q", c.name, got.State, c.state)
		}
	}
}

func TestAnUnhealthyContainerIsRestarted(t *testing.T) {
	g := newRig(t, false)
	sp := spec("web")
	sp.Health = &fsm.Readiness{Kind: "tcp", Port: 80, Interval: time.Nanosecond, Timeout: time.Second, Retries: 2}
	g.facts.Deploy(t, "shop", sp, "a")
	g.round(t) // started, ready
	g.round(t) // healthy
	if st := g.status(t, "web"); !st.Ready || st.State != fsm.StateRunning || len(g.rt.stops) != 0 {
		t.Fatalf("status %+v, stops %v", st, g.rt.stops)
	}
	g.rt.healthErr = errors.New("connection refused")
	g.round(t) // one failure: unhealthy, not yet restarted
	if st := g.status(t, "web"); st.State != fsm.StateUnhealthy || len(g.rt.stops) != 0 {
		t.Fatalf("after one failure: status %+v, stops %v", st, g.rt.stops)
	}
	g.round(t) // the second: restarted
	if len(g.rt.stops) != 1 || len(g.rt.restarts) != 1 || len(g.rt.started) != 1 {
		t.Fatalf("stops %v restarts %v starts %v", g.rt.stops, g.rt.restarts, g.rt.started)
	}
	g.rt.healthErr = nil
	g.round(t) // ready again
	st := g.status(t, "web")
	if !st.Ready || st.State != fsm.StateRunning || st.Restarts != 1 || st.LastExit == nil || st.LastExit.Reason != fsm.StateUnhealthy {
		t.Fatalf("after the restart: %+v (last exit %+v)", st, st.LastExit)
	}
}

func TestABusyServiceIsLeftAlone(t *testing.T) {
	g := newRig(t, false)
	g.facts.Deploy(t, "shop", spec("web"), "a")
	g.round(t)
	busy := true
	g.r.cfg.Busy = func(key string) bool { return busy && key == "shop/web" }
	// Stopped by a restart under way: not the reconciler's to start.
	g.rt.set("shop/web", func(c *runtime.Container) {
		c.Running, c.State, c.LastExit = false, "exited", &fsm.Exit{Code: 0, At: time.Now()}
	})
	g.round(t)
	if len(g.rt.removed) != 0 || len(g.rt.started) != 1 {
		t.Fatalf("a busy service was touched: removed %v started %v", g.rt.removed, g.rt.started)
	}
	busy = false
	g.round(t)
	if len(g.rt.started) != 2 {
		t.Fatalf("once not busy, a stopped container is started again: %v", g.rt.started)
	}
}

func TestHealthRunsForAContainerThatNeverGotReady(t *testing.T) {
	now := time.Now()
	sp := fsm.ServiceSpec{Health: &fsm.Readiness{Interval: time.Second, Retries: 2},
		Readiness: &fsm.Readiness{Interval: time.Second, Retries: 3, StartPeriod: 2 * time.Second}}
	young := runtime.Container{StartedAt: now.Add(-5 * time.Second)}
	old := runtime.Container{StartedAt: now.Add(-7 * time.Second)}
	if neverReady(young, sp, now) || !neverReady(old, sp, now) {
		t.Fatal("the readiness budget is start period + (retries+1) × interval = 6 s")
	}
	sp.Health = nil
	if neverReady(old, sp, now) {
		t.Fatal("no health check, nothing to run")
	}
}
