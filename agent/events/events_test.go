package events

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// The fact store's hook keeps an event per telling command, in the
// facts' names; a follower gets the kept ones, then each new one.
func TestEventsTellTheChangesInOrder(t *testing.T) {
	st := facttest.NewStore()
	l := New()
	apply := func(c fsm.Command) {
		t.Helper()
		st.Must(t, c)
		index := uint64(len(st.Applied()))
		st.Read(func(s *fsm.State) { l.Applied(index, c, s) })
	}
	apply(fsm.RegisterMachine{Machine: fsm.Machine{ID: "m1", Name: "alpha", State: fsm.MachineActive}, At: facttest.T0})
	apply(fsm.AcquireLock{Namespace: "shop", Holder: "alpha/deploy/x", Lease: time.Hour, At: time.Now()})
	apply(fsm.PutService{Namespace: "shop", Holder: "alpha/deploy/x", Spec: fsm.ServiceSpec{Name: "web", Image: "img:1"}, MachineID: "m1", ServicePrefix: facttest.ServicePrefix, At: time.Now()})
	apply(fsm.SetServiceStatus{Namespace: "shop", Name: "web", MachineID: "m1", Generation: 1, Ready: true, At: time.Now()})

	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan ctlapi.Event, 10)
	done := make(chan error, 1)
	go func() { done <- l.Follow(ctx, true, func(ev ctlapi.Event) { got <- ev }) }()
	var lines []string
	for range 3 {
		ev := <-got
		lines = append(lines, ev.Kind+" "+ev.Subject+": "+ev.Message)
	}
	apply(fsm.SetMachineState{ID: "m1", State: fsm.MachineDraining, At: time.Now()})
	ev := <-got
	lines = append(lines, ev.Kind+" "+ev.Subject+": "+ev.Message)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := []string{"machine alpha: registered (active)", "deploy shop/web: generation 1 on alpha (img:1)",
		"service shop/web: ready on alpha (generation 1)", "machine alpha: now draining"}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("events:\n%s\nwant:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	// Without follow: the kept ones, then the end.
	var n int
	if err := l.Follow(context.Background(), false, func(ctlapi.Event) { n++ }); err != nil || n != 4 {
		t.Fatalf("kept events %d, %v", n, err)
	}
}
