package drain

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/migrate"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
	"github.com/drover-sh/drover/volume"
)

// fakeMigrations moves services through the facts as a migration would,
// with an outcome scripted per target machine.
type fakeMigrations struct {
	t     *testing.T
	facts *facttest.Store
	mu    sync.Mutex
	// outcome per target name: "" moves, "refuse" fails the pre-flight,
	// "abort" starts and aborts.
	outcome   map[string]string
	local     map[string]migrate.LocalFacts
	moves     []string // service -> target, as asked
	recovered chan struct{}
	// followed, when set, is waited for before a migration runs: the
	// events a test expects reach only a follower already subscribed.
	followed func()
	n        int
	// hold keeps each move's namespace lock this long; lockRefused counts
	// the moves refused because another held it.
	hold        time.Duration
	lockRefused int
}

func newFakeMigrations(t *testing.T, facts *facttest.Store) *fakeMigrations {
	r := make(chan struct{})
	close(r)
	return &fakeMigrations{t: t, facts: facts, outcome: map[string]string{}, local: map[string]migrate.LocalFacts{}, recovered: r}
}

func (f *fakeMigrations) Migrate(ctx context.Context, req ctlapi.MigrateRequest, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	f.mu.Lock()
	f.n++
	id := fmt.Sprintf("m%d", f.n)
	f.moves = append(f.moves, req.Service+"->"+req.To)
	outcome := f.outcome[req.To]
	followed := f.followed
	f.mu.Unlock()
	if followed != nil {
		followed()
	}
	if outcome == "refuse" {
		return ctlapi.MigrationInfo{}, errors.New("pre-flight failed, nothing moved: image on target: missing")
	}
	ns, svc, _ := strings.Cut(req.Service, "/")
	var target fsm.Machine
	f.facts.Read(func(s *fsm.State) { target, _ = s.MachineByName(req.To) })
	holder := "x/migrate/" + id
	apply := func(c fsm.Command) error { _, err := f.facts.Apply(ctx, c); return err }
	if err := apply(fsm.AcquireLock{Namespace: ns, Holder: holder, Lease: time.Hour, At: time.Now()}); err != nil {
		f.mu.Lock()
		f.lockRefused++
		f.mu.Unlock()
		return ctlapi.MigrationInfo{}, err
	}
	time.Sleep(f.hold)
	defer apply(fsm.ReleaseLock{Namespace: ns, Holder: holder, At: time.Now()})
	apply(fsm.StartMigration{ID: id, Namespace: ns, Service: svc, TargetID: target.ID, Holder: holder, At: time.Now()})
	emit(ctlapi.MigrationEvent{Kind: "phase", Phase: "warm-copy"})
	if outcome == "abort" {
		apply(fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborting, Error: "target restarted", At: time.Now()})
		apply(fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborted, At: time.Now()})
		return ctlapi.MigrationInfo{ID: id}, errors.New("migration aborted: target restarted")
	}
	for _, p := range []fsm.MigrationPhase{fsm.PhaseWarmCopy, fsm.PhaseSourceStopped, fsm.PhaseFinalCopy, fsm.PhaseTargetStarting} {
		apply(fsm.AdvanceMigration{ID: id, Phase: p, At: time.Now()})
	}
	apply(fsm.CommitMigration{ID: id, Holder: holder, ReadyAt: time.Now(), At: time.Now()})
	apply(fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseDone, At: time.Now()})
	return ctlapi.MigrationInfo{ID: id, Phase: "done"}, nil
}

func (f *fakeMigrations) Cancel(string, error) bool { return false }

func (f *fakeMigrations) LocalFacts(_ context.Context, machineID string, q migrate.LocalQuery) (migrate.LocalFacts, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	lf, ok := f.local[machineID]
	if !ok {
		return lf, fmt.Errorf("machine %s does not answer", machineID)
	}
	return lf, nil
}

func (f *fakeMigrations) Recovered() <-chan struct{} { return f.recovered }

type rig struct {
	facts   *facttest.Store
	members *facttest.Members
	migs    *fakeMigrations
	d       *Drainer
}

func newRig(t *testing.T, machines ...string) *rig {
	g := &rig{facts: facttest.NewStore(), members: facttest.NewMembers()}
	g.migs = newFakeMigrations(t, g.facts)
	for _, m := range machines {
		g.facts.AddMachine(t, m, m)
		g.members.Set(m, m, cluster.LivenessAlive)
		g.migs.local[m] = migrate.LocalFacts{VolumeFreeBytes: 4 << 30, MemoryBytes: 4 << 30, HoldsVolumes: true,
			Images: map[string]bool{"img:1": true}, Volumes: map[string]volume.Info{"data": {ReferencedBytes: 100 << 20}}}
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.d = New(ctx, Config{Self: machines[0], ExecutorGrace: time.Minute, Interval: 10 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, g.facts, g.members, g.migs)
	t.Cleanup(func() {
		cancel()
		g.d.Wait()
	})
	return g
}

func webSpec(name string, volumes ...string) fsm.ServiceSpec {
	sp := fsm.ServiceSpec{Name: name, Image: "img:1", MemoryBytes: 64 << 20}
	for _, v := range volumes {
		sp.Volumes = append(sp.Volumes, fsm.VolumeMount{Name: v, MountPath: "/" + v, QuotaBytes: 1 << 30})
	}
	return sp
}

func (g *rig) drainFact() fsm.Drain {
	var d fsm.Drain
	g.facts.Read(func(s *fsm.State) { d, _ = s.Drain("a") })
	return d
}

func TestDrainMovesEverythingAndEndsDrained(t *testing.T) {
	g := newRig(t, "x", "a", "b", "c")
	g.facts.Deploy(t, "shop", webSpec("web", "data"), "a")
	g.facts.Deploy(t, "tools", webSpec("cron"), "a")
	g.migs.followed = func() { waitFollowed(t, g.d, "a") }
	var events []ctlapi.DrainEvent
	info, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "a", Wait: true, Parallel: 2}, func(ev ctlapi.DrainEvent) { events = append(events, ev) })
	if err != nil {
		t.Fatalf("drain: %v", err)
	}
	if info.State != "drained" || info.Moved != 2 || info.Left != 0 || info.Executor != "x" {
		t.Fatalf("drain %+v", info)
	}
	var on []string
	g.facts.Read(func(s *fsm.State) {
		for _, sv := range s.Services() {
			on = append(on, sv.Key()+"@"+sv.MachineID)
		}
		m, _ := s.Machine("a")
		on = append(on, "a is "+string(m.State))
	})
	if strings.Contains(strings.Join(on, " "), "@a") || !strings.Contains(strings.Join(on, " "), "a is drained") {
		t.Fatalf("after the drain: %v", on)
	}
	if len(events) == 0 {
		t.Fatal("no events while waiting")
	}
}

func TestDrainReplansAwayFromARefusingTarget(t *testing.T) {
	g := newRig(t, "x", "a", "b", "c")
	g.facts.Deploy(t, "shop", webSpec("web", "data"), "a")
	lb := g.migs.local["b"]
	lb.VolumeFreeBytes = 8 << 30 // b looks best, and refuses
	g.migs.local["b"] = lb
	g.migs.outcome["b"] = "refuse"
	info, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "a", Wait: true}, func(ctlapi.DrainEvent) {})
	if err != nil || info.State != "drained" || info.Items[0].Target != "c" {
		t.Fatalf("drain %+v, %v", info, err)
	}
	if got := strings.Join(g.migs.moves, " "); got != "shop/web->b shop/web->c" {
		t.Fatalf("moves %s", got)
	}
}

func TestDrainGivesUpAfterRepeatedAbortsAndSaysWhy(t *testing.T) {
	g := newRig(t, "x", "a", "b")
	g.facts.Deploy(t, "shop", webSpec("web", "data"), "a")
	g.migs.outcome["b"] = "abort"
	info, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "a", Wait: true}, func(ctlapi.DrainEvent) {})
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeDrainIncomplete || info.State != "incomplete" {
		t.Fatalf("drain %+v, %v", info, err)
	}
	if len(g.migs.moves) != attempts || info.Items[0].State != "failed" || !strings.Contains(info.Items[0].Reason, "target restarted") {
		t.Fatalf("after %d attempts: %+v", len(g.migs.moves), info.Items)
	}
}

func TestDryRunPlansAndRecordsNothing(t *testing.T) {
	g := newRig(t, "x", "a", "b")
	g.facts.Deploy(t, "shop", webSpec("web", "data"), "a")
	pinned := webSpec("pinned")
	pinned.Binds = []fsm.BindMount{{HostPath: "/srv/x", MountPath: "/x"}}
	pinned.Machine = "a"
	g.facts.Deploy(t, "shop", pinned, "a")
	info, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "a", DryRun: true}, nil)
	if err != nil || info.State != "planned" || len(info.Items) != 2 {
		t.Fatalf("dry run %+v, %v", info, err)
	}
	if info.Items[0].Service != "shop/pinned" || info.Items[0].State != "stays" || !strings.Contains(info.Items[0].Reason, "/srv/x") {
		t.Fatalf("bind-mounted service %+v", info.Items[0])
	}
	if _, ok := g.facts.Applied()[len(g.facts.Applied())-1].(fsm.StartDrain); ok {
		t.Fatal("a dry run recorded a drain")
	}
	if _, err := g.d.Status(context.Background(), "a"); err == nil {
		t.Fatal("a dry run left a drain to show")
	}
	if _, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "a", Parallel: -1}, nil); err == nil {
		t.Fatal("negative parallelism accepted")
	}
	if _, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "zz"}, nil); err == nil || !strings.Contains(err.Error(), `"zz"`) {
		t.Fatalf("unknown machine: %v", err)
	}
}

func TestResumeRunsTheDrainsOfThisMachineAndEndsThoseOfGoneExecutors(t *testing.T) {
	g := newRig(t, "x", "a", "b", "y")
	g.facts.Deploy(t, "shop", webSpec("web", "data"), "a")
	// A drain this machine ran before it restarted.
	g.facts.Must(t, fsm.StartDrain{Drain: fsm.Drain{MachineID: "a", Executor: "x", Parallel: 1,
		Items: []fsm.DrainItem{{Service: "shop/web", Target: "b", State: fsm.ItemPending}}}, At: time.Now()})
	g.d.Start()
	deadline := time.Now().Add(5 * time.Second)
	for g.drainFact().State == fsm.DrainRunning && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if st := g.drainFact().State; st != fsm.DrainDrained {
		t.Fatalf("resumed drain ended %s", st)
	}
	// On the leader: a drain whose executor gossip sees gone ends after the grace.
	g.facts.Deploy(t, "shop", webSpec("api"), "b")
	g.facts.Must(t, fsm.StartDrain{Drain: fsm.Drain{MachineID: "b", Executor: "y", Parallel: 1,
		Items: []fsm.DrainItem{{Service: "shop/api", Target: "x", State: fsm.ItemPending}}}, At: time.Now()})
	g.members.Set("y", "y", cluster.LivenessFailed)
	g.members.SetLeader(true)
	gone := map[string]time.Time{}
	now := time.Now()
	g.d.resume(context.Background(), gone, now)
	g.d.resume(context.Background(), gone, now.Add(30*time.Second))
	var d fsm.Drain
	g.facts.Read(func(s *fsm.State) { d, _ = s.Drain("b") })
	if d.State != fsm.DrainRunning {
		t.Fatalf("ended before the grace: %s", d.State)
	}
	g.d.resume(context.Background(), gone, now.Add(2*time.Minute))
	g.facts.Read(func(s *fsm.State) { d, _ = s.Drain("b") })
	if d.State != fsm.DrainIncomplete || !strings.Contains(d.Note, "executor y has been gone") {
		t.Fatalf("drain of a gone executor: %s %q", d.State, d.Note)
	}
}

// waitFollowed waits until the drain of machineID running here has a
// follower.
func waitFollowed(t *testing.T, d *Drainer, machineID string) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		d.mu.Lock()
		r := d.runs[machineID]
		d.mu.Unlock()
		if r != nil {
			r.mu.Lock()
			n := len(r.subs)
			r.mu.Unlock()
			if n > 0 {
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Errorf("nobody followed the drain of %s", machineID)
}

// Two services of one namespace on a drained machine, with room for two
// moves at once: they move one after the other (each move holds the
// namespace's lock), none is refused for the drain's own lock.
func TestDrainMovesOneNamespaceOneAtATime(t *testing.T) {
	g := newRig(t, "x", "a", "b", "c")
	g.facts.Deploy(t, "shop", webSpec("web", "data"), "a")
	g.facts.Deploy(t, "shop", webSpec("api", "cache"), "a")
	g.migs.hold = 50 * time.Millisecond
	info, err := g.d.Drain(context.Background(), ctlapi.DrainRequest{Machine: "a", Wait: true, Parallel: 2}, func(ctlapi.DrainEvent) {})
	if err != nil || info.State != "drained" || info.Moved != 2 {
		t.Fatalf("drain %+v, %v", info, err)
	}
	if g.migs.lockRefused != 0 || len(g.migs.moves) != 2 {
		t.Fatalf("%d moves refused for the namespace lock; moves %v", g.migs.lockRefused, g.migs.moves)
	}
}
