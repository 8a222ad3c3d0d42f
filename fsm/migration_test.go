package fsm

import (
	"strings"
	"testing"
	"time"
)

func migrationState(t *testing.T) *State {
	s := deployState(t)
	mustApply(t, s, PutService{Namespace: "shop", Holder: "d", Spec: webSpec(), MachineID: "a1", ServicePrefix: svcPrefix, At: t0})
	return s
}

func advance(t *testing.T, s *State, phase MigrationPhase) Migration {
	t.Helper()
	return mustApply(t, s, AdvanceMigration{ID: "m1", Phase: phase, At: t0.Add(time.Second)}).(Migration)
}

func TestMigrationForwardToCommit(t *testing.T) {
	s := migrationState(t)
	expectRule(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "a1", Holder: "d", At: t0}, ErrInvalid)
	expectRule(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "x", At: t0}, ErrLockNotHeld)
	expectRule(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "nope", TargetID: "b2", Holder: "d", At: t0}, ErrUnknownService)
	m := mustApply(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d", At: t0}).(Migration)
	if m.SourceID != "a1" || m.Phase != PhasePlanned || len(m.Volumes) != 1 || m.Volumes[0].Name != "data" {
		t.Fatalf("started %+v", m)
	}
	expectRule(t, s, StartMigration{ID: "m2", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d", At: t0}, ErrInvalid)

	advance(t, s, PhaseWarmCopy)
	advance(t, s, PhaseWarmCopy) // progress within a phase
	m = advance(t, s, PhaseSourceStopped)
	if m.SourceStoppedAt.IsZero() {
		t.Fatal("no source-stopped time")
	}
	expectRule(t, s, AdvanceMigration{ID: "m1", Phase: PhaseWarmCopy, At: t0}, ErrInvalid) // no going back
	expectRule(t, s, CommitMigration{ID: "m1", Holder: "d", At: t0}, ErrInvalid)           // not started on the target yet
	advance(t, s, PhaseFinalCopy)
	advance(t, s, PhaseTargetStarting)
	expectRule(t, s, AdvanceMigration{ID: "m1", Phase: PhaseCommitted, At: t0}, ErrInvalid) // only CommitMigration commits
	expectRule(t, s, CommitMigration{ID: "m1", Holder: "x", At: t0}, ErrLockNotHeld)

	// The commit moves ownership and placement in one command.
	m = mustApply(t, s, CommitMigration{ID: "m1", Holder: "d", At: t0.Add(30 * time.Second)}).(Migration)
	if m.Phase != PhaseCommitted {
		t.Fatalf("phase %s", m.Phase)
	}
	if v, _ := s.Volume("shop", "data"); v.OwnerID != "b2" {
		t.Fatalf("volume owner %s", v.OwnerID)
	}
	if sv, _ := s.Service("shop", "web"); sv.MachineID != "b2" || sv.ServiceIP.String() != "10.211.0.1" {
		t.Fatalf("service after commit %+v", sv)
	}
	// After the commit: only forward.
	rule := expectRule(t, s, AdvanceMigration{ID: "m1", Phase: PhaseAborting, At: t0}, ErrInvalid)
	if !strings.Contains(rule.Message, "only goes forward") {
		t.Fatalf("refusal does not say why: %q", rule.Message)
	}
	advance(t, s, PhaseDone)
	if _, busy := s.ActiveMigration("shop", "web"); busy {
		t.Fatal("a done migration counts as active")
	}
	expectRule(t, s, AdvanceMigration{ID: "m1", Phase: PhaseDone, At: t0}, ErrInvalid)
}

func TestMigrationAbortBeforeCommit(t *testing.T) {
	s := migrationState(t)
	mustApply(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d", At: t0})
	advance(t, s, PhaseWarmCopy)
	advance(t, s, PhaseSourceStopped)
	expectRule(t, s, AdvanceMigration{ID: "m1", Phase: PhaseAborted, At: t0}, ErrInvalid) // abort goes through aborting
	m := mustApply(t, s, AdvanceMigration{ID: "m1", Phase: PhaseAborting, Error: "target disk full", At: t0}).(Migration)
	if m.Error != "target disk full" {
		t.Fatalf("error not kept: %+v", m)
	}
	expectRule(t, s, AdvanceMigration{ID: "m1", Phase: PhaseFinalCopy, At: t0}, ErrInvalid)
	expectRule(t, s, CommitMigration{ID: "m1", Holder: "d", At: t0}, ErrInvalid)
	advance(t, s, PhaseAborted)
	if v, _ := s.Volume("shop", "data"); v.OwnerID != "a1" {
		t.Fatalf("an aborted migration moved the volume to %s", v.OwnerID)
	}
	// The service can be moved again, and the history is in snapshots.
	mustApply(t, s, StartMigration{ID: "m2", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d", At: t0.Add(time.Second)})
	restored, err := ReadSnapshotBytes(snapshotBytes(t, s))
	if err != nil || len(restored.Migrations()) != 2 || restored.Migrations()[0].ID != "m1" {
		t.Fatalf("restored migrations %v %+v", err, restored.Migrations())
	}
}

func TestMigrationSeededBaseAndPurge(t *testing.T) {
	s := migrationState(t)
	// A seed must list every volume of the service, once.
	expectRule(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d",
		Volumes: []MigrationVolume{{Name: "other"}}, At: t0}, ErrInvalid)
	m := mustApply(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d",
		Volumes: []MigrationVolume{{Name: "data", LastSnapshot: "drover-m0-final", GUID: 7, BytesSent: 99, TotalBytes: 1 << 20}}, RollbackOf: "m0", At: t0}).(Migration)
	if v := m.Volumes[0]; v.Base != "drover-m0-final" || v.LastSnapshot != v.Base || v.BytesSent != 0 || v.TotalBytes != 1<<20 || m.RollbackOf != "m0" {
		t.Fatalf("seeded migration %+v", m)
	}
	expectRule(t, s, PurgeSource{ID: "m1", At: t0}, ErrInvalid) // not done
	advance(t, s, PhaseWarmCopy)
	advance(t, s, PhaseSourceStopped)
	advance(t, s, PhaseFinalCopy)
	advance(t, s, PhaseTargetStarting)
	m = mustApply(t, s, CommitMigration{ID: "m1", Holder: "d", ReadyAt: t0.Add(3 * time.Second), At: t0.Add(4 * time.Second)}).(Migration)
	if m.Downtime() != 2*time.Second {
		t.Fatalf("downtime %v: stopped %v, ready %v", m.Downtime(), m.SourceStoppedAt, m.TargetReadyAt)
	}
	m = advance(t, s, PhaseDone)
	if m.EndedAt.IsZero() {
		t.Fatal("no end time")
	}
	m = mustApply(t, s, PurgeSource{ID: "m1", At: t0.Add(time.Hour)}).(Migration)
	if m.SourcePurgedAt.IsZero() {
		t.Fatal("purge not recorded")
	}
	expectRule(t, s, PurgeSource{ID: "nope", At: t0}, ErrUnknownMigration)
}
