package fsm

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

func TestFailoverOnlyAfterTheLeaseAndToTheReplica(t *testing.T) {
	s := NewState()
	for _, id := range []string{"a", "b", "c"} {
		mustApply(t, s, RegisterMachine{Machine: machine(id, id), At: t0})
	}
	mustApply(t, s, AcquireLock{Namespace: "shop", Holder: "me", Lease: time.Hour, At: t0})
	spec := ServiceSpec{Name: "db", Image: "img", Volumes: []VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}},
		Standby: &StandbySpec{Interval: 10 * time.Second}}
	put := PutService{Namespace: "shop", Spec: spec, MachineID: "a", ServicePrefix: netip.MustParsePrefix("10.200.0.0/24"), Holder: "me", At: t0}
	expectRule(t, s, put, ErrInvalid) // a standby asked, none named
	put.StandbyID = "a"
	expectRule(t, s, put, ErrInvalid) // not itself
	put.StandbyID = "b"
	mustApply(t, s, put)
	mustApply(t, s, RenewLease{MachineID: "a", Duration: StandbyLease, At: t0})
	fo := Failover{Namespace: "shop", Name: "db", To: "b", At: t0.Add(time.Hour)}
	expectRule(t, s, fo, ErrNoStandby) // no replica yet
	rec := RecordReplica{Namespace: "shop", Name: "db", OwnerID: "a", StandbyID: "b", Snapshot: "drover-standby-1", TakenAt: t0.Add(time.Second), At: t0.Add(time.Second)}
	bad := rec
	bad.OwnerID = "c"
	expectRule(t, s, bad, ErrInvalid) // only the owner records
	mustApply(t, s, rec)
	older := rec
	older.TakenAt = t0
	expectRule(t, s, older, ErrInvalid)
	wrong := fo
	wrong.To = "c"
	expectRule(t, s, wrong, ErrNoStandby)
	early := fo
	early.At = t0.Add(StandbyLease + ClockDriftMargin) // the lease plus the margin, not after
	if rule := expectRule(t, s, early, ErrLeaseHeld); rule.Message == "" {
		t.Fatal("no reason")
	}
	// A lease never shrinks.
	mustApply(t, s, RenewLease{MachineID: "a", Duration: time.Second, At: t0})
	if l, _ := s.LeaseOf("a"); !l.Until.Equal(t0.Add(StandbyLease)) {
		t.Fatalf("lease %v", l)
	}
	sv := mustApply(t, s, Failover{Namespace: "shop", Name: "db", To: "b", At: t0.Add(StandbyLease + ClockDriftMargin + time.Millisecond)}).(Service)
	if sv.MachineID != "b" || sv.StandbyID != "a" || sv.Replica != nil || sv.LastFailover == nil ||
		sv.LastFailover.Snapshot != "drover-standby-1" || !sv.LastFailover.TakenAt.Equal(t0.Add(time.Second)) {
		t.Fatalf("after the failover: %+v %+v", sv, sv.LastFailover)
	}
	if v, _ := s.Volume("shop", "data"); v.OwnerID != "b" {
		t.Fatalf("volume owner %s", v.OwnerID)
	}
	// The old owner settles once; a snapshot keeps it all.
	mustApply(t, s, SettleFailover{Namespace: "shop", Name: "db", MachineID: "a", DivergedBytes: 4096, KeptAs: []string{"p-diverged/shop/data-1"}, At: t0.Add(time.Minute)})
	expectRule(t, s, SettleFailover{Namespace: "shop", Name: "db", MachineID: "a", At: t0.Add(time.Minute)}, ErrInvalid)
	raw := snapshotBytes(t, s)
	back, err := ReadSnapshot(bytes.NewReader(raw))
	if err != nil || !bytes.Equal(raw, snapshotBytes(t, back)) {
		t.Fatalf("round trip: %v", err)
	}
	if sv, _ := back.Service("shop", "db"); !sv.LastFailover.Settled || sv.LastFailover.DivergedBytes != 4096 {
		t.Fatalf("restored %+v", sv.LastFailover)
	}
	if l, ok := back.LeaseOf("a"); !ok || !l.Until.Equal(t0.Add(StandbyLease)) {
		t.Fatalf("restored lease %v", l)
	}
}

func TestAMoveOntoTheStandbyMakesTheSourceTheStandby(t *testing.T) {
	s := NewState()
	for _, id := range []string{"a", "b"} {
		mustApply(t, s, RegisterMachine{Machine: machine(id, id), At: t0})
	}
	mustApply(t, s, AcquireLock{Namespace: "shop", Holder: "me", Lease: time.Hour, At: t0})
	spec := ServiceSpec{Name: "db", Image: "img", Volumes: []VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}},
		Standby: &StandbySpec{Interval: 10 * time.Second}}
	mustApply(t, s, PutService{Namespace: "shop", Spec: spec, MachineID: "a", StandbyID: "b", ServicePrefix: netip.MustParsePrefix("10.200.0.0/24"), Holder: "me", At: t0})
	m := mustApply(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "db", TargetID: "b", Holder: "me", At: t0}).(Migration)
	for _, p := range []MigrationPhase{PhaseWarmCopy, PhaseSourceStopped, PhaseFinalCopy, PhaseTargetStarting} {
		mustApply(t, s, AdvanceMigration{ID: m.ID, Phase: p, At: t0})
	}
	mustApply(t, s, CommitMigration{ID: m.ID, Holder: "me", At: t0})
	if sv, _ := s.Service("shop", "db"); sv.MachineID != "b" || sv.StandbyID != "a" {
		t.Fatalf("after the move: owner %s, standby %s", sv.MachineID, sv.StandbyID)
	}
}
