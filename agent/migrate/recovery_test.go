package migrate

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

var allPhases = []fsm.MigrationPhase{fsm.PhasePlanned, fsm.PhaseWarmCopy, fsm.PhaseSourceStopped, fsm.PhaseFinalCopy, fsm.PhaseTargetStarting, fsm.PhaseCommitted}

// Recovery's decision, for every phase and for each machine that may
// find a migration nobody runs: the executor's daemon after a restart
// (its name is in the lock holder) and the leader once the executor's
// lease ran out. Before the commit it aborts, after it completes; the
// service ends on exactly one machine, the one the facts name.
func TestRecoveryAbortsBeforeTheCommitAndCompletesAfter(t *testing.T) {
	for _, phase := range allPhases {
		for _, role := range []string{"restarted executor", "leader after the lease"} {
			t.Run(fmt.Sprintf("%s/%s", phase, role), func(t *testing.T) {
				c := newCluster(t, "a", "b", "c")
				c.deploy("a")
				holder, finder := "a/migrate/m1", c.m["a"]
				if role == "leader after the lease" {
					holder, finder = "c/migrate/m1", c.m["b"]
					c.members.SetLeader(true)
				}
				c.orphan("m1", "b", holder, phase)
				if role == "leader after the lease" {
					c.facts.Must(t, fsm.ReleaseLock{Namespace: "shop", Holder: holder, At: time.Now()})
				}
				finder.mig.finishOrphans(context.Background())

				m := c.migration("m1")
				src, tgt := c.m["a"], c.m["b"]
				srcCtr, onSrc := src.rt.container("shop", "web")
				_, onTgt := tgt.rt.container("shop", "web")
				if phase.Committed() {
					if m.Phase != fsm.PhaseDone || c.owner() != "b" || onSrc || !onTgt {
						t.Fatalf("committed orphan: %s, owner %s, on source %v, on target %v", m.Phase, c.owner(), onSrc, onTgt)
					}
				} else {
					if m.Phase != fsm.PhaseAborted || c.owner() != "a" || !onSrc || !srcCtr.Running || onTgt {
						t.Fatalf("orphan before the commit: %s, owner %s, source running %v, on target %v", m.Phase, c.owner(), srcCtr.Running, onTgt)
					}
					if names := tgt.vols.names(); len(names) != 0 {
						t.Fatalf("target kept %v", names)
					}
				}
				if c.lockHolder() != "" {
					t.Fatalf("lock still held by %s", c.lockHolder())
				}
			})
		}
	}
}

// findOrphans: which migrations a machine takes for orphans.
func TestFindOrphans(t *testing.T) {
	c := newCluster(t, "a", "b", "c")
	c.deploy("a")
	c.orphan("m1", "b", "c/migrate/m1", fsm.PhaseWarmCopy)
	now := time.Now()
	find := func(running map[string]bool, prefix string, leader bool, at time.Time) (out []string) {
		c.facts.Read(func(s *fsm.State) {
			for _, o := range findOrphans(s, running, prefix, leader, at) {
				out = append(out, o.m.ID+": "+o.why)
			}
		})
		return out
	}
	if got := find(nil, "c/migrate/", false, now); len(got) != 1 || got[0] != "m1: the daemon running it restarted" {
		t.Fatalf("executor after a restart: %v", got)
	}
	if got := find(map[string]bool{"m1": true}, "c/migrate/", true, now.Add(time.Hour)); len(got) != 0 {
		t.Fatalf("a migration this daemon runs: %v", got)
	}
	if got := find(nil, "b/migrate/", false, now.Add(time.Hour)); len(got) != 0 {
		t.Fatalf("a follower took another executor's migration: %v", got)
	}
	if got := find(nil, "b/migrate/", true, now); len(got) != 0 {
		t.Fatalf("the leader took a migration whose lease holds: %v", got)
	}
	if got := find(nil, "b/migrate/", true, now.Add(time.Hour)); len(got) != 1 || got[0] != "m1: the executor's lease on the namespace lock ran out" {
		t.Fatalf("leader after the lease: %v", got)
	}
}

// A target that was away when an abort ran undoes its part when it is
// back: the container, the adopted copy, and staging copies of ended
// migrations; what it owns stays.
func TestLeftoversOfAbortsAreUndoneOnTheTarget(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	c.orphan("m1", "b", "a/migrate/m1", fsm.PhaseTargetStarting)
	c.facts.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseAborting, Error: "target went away", At: time.Now()})
	c.facts.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseAborted, At: time.Now()})
	b := c.m["b"]
	b.vols.create(b.vols.StagingDataset("m0", "data")) // of an older migration that ended
	c.facts.Must(t, fsm.ReleaseLock{Namespace: "shop", Holder: "a/migrate/m1", At: time.Now()})
	c.facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "x", Lease: time.Minute, At: time.Now()})
	c.facts.Must(t, fsm.StartMigration{ID: "m0", Namespace: "shop", Service: "web", TargetID: "b", Holder: "x", At: time.Now()})
	c.facts.Must(t, fsm.AdvanceMigration{ID: "m0", Phase: fsm.PhaseAborting, At: time.Now()})
	c.facts.Must(t, fsm.AdvanceMigration{ID: "m0", Phase: fsm.PhaseAborted, At: time.Now()})
	undone := map[string]bool{}
	b.mig.undoLeftovers(context.Background(), undone)
	if _, ok := b.rt.container("shop", "web"); ok || !undone["m1"] {
		t.Fatalf("container still on the target (undone %v)", undone)
	}
	if names := b.vols.names(); len(names) != 0 {
		t.Fatalf("target kept %v", names)
	}
	if !c.m["a"].vols.Exists(c.m["a"].vols.Dataset("shop", "data")) {
		t.Fatal("the owner's dataset is gone")
	}
}

// The source destroys the copy it kept once the safety window is over,
// and records it; a copy that is live again stays.
func TestExpiredSourceCopiesArePurged(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	a := c.m["a"]
	info, err := a.mig.Migrate(context.Background(), migrateTo("b"), func(ctlapi.MigrationEvent) {})
	if err != nil {
		t.Fatal(err)
	}
	a.mig.purgeExpired(context.Background())
	if !a.vols.Exists(a.vols.Dataset("shop", "data")) {
		t.Fatal("purged inside the safety window")
	}
	a.mig.cfg.SafetyWindow = time.Nanosecond
	a.mig.purgeExpired(context.Background())
	if a.vols.Exists(a.vols.Dataset("shop", "data")) || c.migration(info.ID).SourcePurgedAt.IsZero() {
		t.Fatal("the expired copy was not purged and recorded")
	}
}

// A lock this daemon took for a migration that ended (or is gone) and
// that it no longer runs is stale; one of a migration it runs, one of an
// unfinished migration and another daemon's are not.
func TestStaleLocks(t *testing.T) {
	st := facttest.NewStore()
	st.AddMachine(t, "a", "a")
	st.AddMachine(t, "b", "b")
	for _, ns := range []string{"done", "gone", "live", "mine", "other"} {
		st.Deploy(t, ns, fsm.ServiceSpec{Name: "web", Image: "img"}, "a")
	}
	now := time.Now()
	for ns, holder := range map[string]string{"done": "a/migrate/m1", "gone": "a/migrate/m2", "live": "a/migrate/m3", "mine": "a/migrate/m4", "other": "b/migrate/m5"} {
		st.Must(t, fsm.AcquireLock{Namespace: ns, Holder: holder, Lease: time.Minute, At: now})
	}
	st.Must(t, fsm.StartMigration{ID: "m1", Namespace: "done", Service: "web", TargetID: "b", Holder: "a/migrate/m1", At: now})
	st.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseAborting, At: now})
	st.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseAborted, At: now})
	st.Must(t, fsm.StartMigration{ID: "m3", Namespace: "live", Service: "web", TargetID: "b", Holder: "a/migrate/m3", At: now})
	var got []string
	st.Read(func(s *fsm.State) {
		for _, l := range staleLocks(s, map[string]bool{"m4": true}, "a/migrate/") {
			got = append(got, l.Namespace)
		}
	})
	if !slices.Equal(got, []string{"done", "gone"}) {
		t.Fatalf("stale locks %v, want done and gone", got)
	}
}
