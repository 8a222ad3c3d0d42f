package fsm

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"
)

func drainPlan() Drain {
	return Drain{MachineID: "a1", Executor: "b2", Parallel: 1, Items: []DrainItem{
		{Service: "shop/web", Target: "b2", State: ItemPending},
		{Service: "shop/logs", State: ItemStays, Reason: "bind mount"},
	}}
}

func TestDrainMarksTheMachineAndEndsDrainedOnlyWhenEmpty(t *testing.T) {
	s := migrationState(t)
	d := mustApply(t, s, StartDrain{Drain: drainPlan(), At: t0}).(Drain)
	if d.State != DrainRunning || !d.StartedAt.Equal(t0) {
		t.Fatalf("started %+v", d)
	}
	if m, _ := s.Machine("a1"); m.State != MachineDraining {
		t.Fatalf("machine is %s, want draining", m.State)
	}
	rule := expectRule(t, s, StartDrain{Drain: drainPlan(), At: t0}, ErrDrainRunning)
	if !strings.Contains(rule.Message, "being drained by") {
		t.Fatalf("refusal does not name the running drain: %q", rule.Message)
	}
	// No new placements on a draining machine: a migration there is refused.
	expectRule(t, s, StartMigration{ID: "m9", Namespace: "shop", Service: "web", TargetID: "a1", Holder: "d", At: t0}, ErrInvalid)

	d = mustApply(t, s, UpdateDrainItem{MachineID: "a1", Item: DrainItem{Service: "shop/web", Target: "b2", State: ItemMigrating, Migration: "m1"}, At: t0}).(Drain)
	if d.Items[0].State != ItemMigrating || d.Items[0].Migration != "m1" {
		t.Fatalf("item not updated: %+v", d.Items)
	}
	expectRule(t, s, UpdateDrainItem{MachineID: "a1", Item: DrainItem{Service: "shop/nope", State: ItemMoved}, At: t0}, ErrInvalid)
	// web and its volume are still on a1.
	rule = expectRule(t, s, EndDrain{MachineID: "a1", State: DrainDrained, At: t0}, ErrInvalid)
	if !strings.Contains(rule.Message, "still holds") {
		t.Fatalf("refusal does not say what is left: %q", rule.Message)
	}
	d = mustApply(t, s, EndDrain{MachineID: "a1", State: DrainIncomplete, Note: "deadline passed", At: t0.Add(time.Minute)}).(Drain)
	if d.State != DrainIncomplete || d.Left() != 2 {
		t.Fatalf("ended %+v, left %d", d, d.Left())
	}
	if m, _ := s.Machine("a1"); m.State != MachineDraining {
		t.Fatalf("an incomplete drain leaves the machine %s, want draining", m.State)
	}
	expectRule(t, s, UpdateDrainItem{MachineID: "a1", Item: DrainItem{Service: "shop/web", State: ItemMoved}, At: t0}, ErrNoDrain)
	// A new drain may start once the last one ended.
	mustApply(t, s, StartDrain{Drain: drainPlan(), At: t0.Add(2 * time.Minute)})
}

func TestActivateCancelsARunningDrain(t *testing.T) {
	s := migrationState(t)
	mustApply(t, s, StartDrain{Drain: drainPlan(), At: t0})
	mustApply(t, s, SetMachineState{ID: "a1", State: MachineActive, At: t0.Add(time.Second)})
	d, _ := s.Drain("a1")
	if d.State != DrainCancelled || d.EndedAt.IsZero() {
		t.Fatalf("drain after activate: %+v", d)
	}
}

func TestDrainedMachineAndSnapshot(t *testing.T) {
	s := deployState(t) // a1 holds nothing yet
	mustApply(t, s, StartDrain{Drain: Drain{MachineID: "a1", Executor: "a1", Parallel: 2}, At: t0})
	mustApply(t, s, EndDrain{MachineID: "a1", State: DrainDrained, At: t0.Add(time.Second)})
	if m, _ := s.Machine("a1"); m.State != MachineDrained {
		t.Fatalf("machine is %s, want drained", m.State)
	}
	var buf bytes.Buffer
	if err := s.WriteSnapshot(&buf); err != nil {
		t.Fatal(err)
	}
	back, err := ReadSnapshot(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back.Drains(), s.Drains()) || len(back.Drains()) != 1 {
		t.Fatalf("drains after snapshot: %+v, want %+v", back.Drains(), s.Drains())
	}
}

func TestRemoveMachineRefusesWhatIsHeldUnlessForced(t *testing.T) {
	s := migrationState(t)
	rule := expectRule(t, s, RemoveMachine{ID: "a1", At: t0}, ErrMachineHolds)
	if !strings.Contains(rule.Message, "service shop/web") || !strings.Contains(rule.Message, "volume shop/data") {
		t.Fatalf("refusal does not list what is held: %q", rule.Message)
	}
	mustApply(t, s, StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b2", Holder: "d", At: t0})
	expectRule(t, s, RemoveMachine{ID: "b2", At: t0}, ErrMachineBusy)
	advance(t, s, PhaseAborting)
	advance(t, s, PhaseAborted)
	lost := mustApply(t, s, RemoveMachine{ID: "a1", Force: true, At: t0}).([]string)
	if len(lost) != 2 {
		t.Fatalf("forced removal reports %v, want the service and the volume", lost)
	}
	if _, ok := s.Machine("a1"); ok {
		t.Fatal("machine still known")
	}
	if _, ok := s.Service("shop", "web"); ok {
		t.Fatal("service of the removed machine still known")
	}
	if _, ok := s.Volume("shop", "data"); ok {
		t.Fatal("volume of the removed machine still known")
	}
}
