package membership

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// seats is the node's Raft configuration and gossip, as far as removal
// goes: removing a seat is recorded, and a machine told to leave goes.
type seats struct {
	*facttest.Members
	mu      sync.Mutex
	removed []string
}

func (s *seats) RemoveServer(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.removed = append(s.removed, id)
	return nil
}

func TestRemoveRefusesWhatWouldLoseDataAndRemovesTheRest(t *testing.T) {
	facts := facttest.NewStore()
	for _, m := range []string{"a", "b", "c"} {
		facts.AddMachine(t, m, m)
	}
	g := &seats{Members: facttest.NewMembers("a", "a", "b", "b", "c", "c")}
	net := peertest.New(t)
	ha, hb := net.Add("a"), net.Add("b")
	left := make(chan string, 1)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ra := New("a", facts, g, ha, quiet, func(string) {})
	rb := New("b", facts, g, hb, quiet, func(from string) {
		g.Set("b", "b", cluster.LivenessLeft) // as gossip sees the leave
		left <- from
	})
	ra.Register(peer.Server{Mux: ha, IDs: ha})
	rb.Register(peer.Server{Mux: hb, IDs: hb})
	facts.Deploy(t, "shop", fsm.ServiceSpec{Name: "web", Image: "img", Volumes: []fsm.VolumeMount{{Name: "data", MountPath: "/d", QuotaBytes: 1 << 20}}}, "c")
	ctx := context.Background()

	code := func(err error) string {
		var apiErr *ctlapi.APIError
		errors.As(err, &apiErr)
		return apiErr.Code
	}
	if _, err := ra.RemoveMachine(ctx, ctlapi.RemoveMachineRequest{Machine: "a"}); code(err) != ctlapi.CodeSelf {
		t.Fatalf("removing itself: %v", err)
	}
	if _, err := ra.RemoveMachine(ctx, ctlapi.RemoveMachineRequest{Machine: "b"}); code(err) != ctlapi.CodeNotDrained {
		t.Fatalf("removing a live active machine: %v", err)
	}
	g.Set("c", "c", cluster.LivenessFailed)
	_, err := ra.RemoveMachine(ctx, ctlapi.RemoveMachineRequest{Machine: "c"})
	if code(err) != ctlapi.CodeMachineHolds || !strings.Contains(err.Error(), "volume shop/data (its only copy is on c)") {
		t.Fatalf("removing a dead machine that holds data: %v", err)
	}
	out, err := ra.RemoveMachine(ctx, ctlapi.RemoveMachineRequest{Machine: "c", Force: true})
	if err != nil || out.Left || len(out.Lost) != 2 {
		t.Fatalf("forced removal %+v, %v", out, err)
	}

	// A live, drained machine is told to leave, and is gone.
	facts.Must(t, fsm.SetMachineState{ID: "b", State: fsm.MachineDrained, At: time.Now()})
	out, err = ra.RemoveMachine(ctx, ctlapi.RemoveMachineRequest{Machine: "b"})
	if err != nil || !out.Left || <-left != "a" {
		t.Fatalf("removing a drained machine %+v, %v", out, err)
	}
	if strings.Join(g.removed, ",") != "c,b" {
		t.Fatalf("raft seats removed: %v", g.removed)
	}
	facts.Read(func(s *fsm.State) {
		if len(s.Machines()) != 1 {
			t.Fatalf("machines left in the facts: %v", s.Machines())
		}
	})

	// Only a member may tell a machine to leave.
	resp, err := net.Raw().Post(hb.URL(routeLeave.Path), "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode == 200 || !strings.Contains(string(body), "leave_refused") {
		t.Fatalf("a non-member's leave: %d %s", resp.StatusCode, body)
	}
}
