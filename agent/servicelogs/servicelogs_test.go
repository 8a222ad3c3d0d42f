package servicelogs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// fakeContainers is one machine's engine: the service's container, if
// any, and its log, which ends when the test says the container stopped.
type fakeContainers struct {
	mu      sync.Mutex
	lines   []runtime.LogLine
	running bool
	changed chan struct{} // closed and replaced on every change
}

func newFakeContainers() *fakeContainers { return &fakeContainers{changed: make(chan struct{})} }

func (f *fakeContainers) set(running bool, lines ...runtime.LogLine) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.running = running
	f.lines = append(f.lines, lines...)
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeContainers) List(context.Context) ([]runtime.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.lines) == 0 && !f.running {
		return nil, nil
	}
	return []runtime.Container{{ID: "c", Namespace: "shop", Service: "web", Running: f.running}}, nil
}

// Logs gives the lines after opts.Since, then, following a running
// container, the lines to come until it stops.
func (f *fakeContainers) Logs(ctx context.Context, _ string, opts runtime.LogOptions, emit func(runtime.LogLine)) error {
	sent := 0
	for {
		f.mu.Lock()
		lines, running, changed := f.lines, f.running, f.changed
		f.mu.Unlock()
		for ; sent < len(lines); sent++ {
			if lines[sent].Time.After(opts.Since) {
				emit(lines[sent])
			}
		}
		if !opts.Follow || !running {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

var t0 = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

func line(i int) runtime.LogLine {
	return runtime.LogLine{Time: t0.Add(time.Duration(i) * time.Second), Stream: "stdout", Text: fmt.Sprintf("line %d", i)}
}

// A follower passes the old machine's lines up to its stop, then the new
// machine's after the commit that moved the service: none lost, none
// twice; it ends when its context does.
func TestFollowGoesOnWithTheNextMachineAfterAMove(t *testing.T) {
	facts, members, net := facttest.NewStore(), facttest.NewMembers(), peertest.New(t)
	engines := map[string]*fakeContainers{}
	var follower *Logs
	for _, id := range []string{"a", "b", "c"} {
		facts.AddMachine(t, id, id)
		members.Set(id, id, "alive")
		h := net.Add(id)
		engines[id] = newFakeContainers()
		l := New(facts, members, h, engines[id])
		l.retry = 10 * time.Millisecond
		l.Register(peer.Server{Mux: h, IDs: h})
		if id == "c" {
			follower = l
		}
	}
	facts.Deploy(t, "shop", fsm.ServiceSpec{Name: "web", Image: "img"}, "a")
	engines["a"].set(true, line(1), line(2))

	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan ctlapi.LogLine, 100)
	done := make(chan error, 1)
	go func() {
		_, err := follower.Follow(ctx, ctlapi.LogsRequest{Service: "shop/web", Follow: true}, func(l ctlapi.LogLine) { got <- l })
		done <- err
	}()
	next := func() ctlapi.LogLine {
		t.Helper()
		select {
		case l := <-got:
			return l
		case <-time.After(5 * time.Second):
			t.Fatal("no line")
			return ctlapi.LogLine{}
		}
	}
	var seen []string
	for range 2 {
		l := next()
		seen = append(seen, l.Machine+":"+l.Text)
	}
	// The source writes its last line and stops; the target's container
	// starts; the commit moves the service.
	engines["a"].set(false, line(3))
	engines["b"].set(true, line(4))
	now := time.Now()
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "m", Lease: time.Hour, At: now})
	facts.Must(t, fsm.StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b", Holder: "m", At: now})
	facts.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseTargetStarting, At: now})
	facts.Must(t, fsm.CommitMigration{ID: "m1", Holder: "m", At: now})
	for range 2 {
		l := next()
		seen = append(seen, l.Machine+":"+l.Text)
	}
	engines["b"].set(true, line(5))
	l := next()
	seen = append(seen, l.Machine+":"+l.Text)
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("follow ended with %v", err)
	}
	want := []string{"a:line 1", "a:line 2", "a:line 3", "b:line 4", "b:line 5"}
	if !slices.Equal(seen, want) {
		t.Fatalf("lines %v, want %v", seen, want)
	}
	select {
	case extra := <-got:
		t.Fatalf("a line twice or out of place: %+v", extra)
	default:
	}
}

// Without -f the lines there are come back, and an unknown service is an
// error that names it.
func TestLogsOnceAndUnknownService(t *testing.T) {
	facts, members, net := facttest.NewStore(), facttest.NewMembers(), peertest.New(t)
	facts.AddMachine(t, "a", "a")
	members.Set("a", "a", "alive")
	h := net.Add("a")
	engine := newFakeContainers()
	l := New(facts, members, h, engine)
	l.Register(peer.Server{Mux: h, IDs: h})
	facts.Deploy(t, "shop", fsm.ServiceSpec{Name: "web", Image: "img"}, "a")
	engine.set(true, line(1), line(2), line(3))
	var texts []string
	res, err := l.Follow(context.Background(), ctlapi.LogsRequest{Service: "shop/web"}, func(l ctlapi.LogLine) { texts = append(texts, l.Text) })
	if err != nil || res.Lines != 3 || !slices.Equal(texts, []string{"line 1", "line 2", "line 3"}) {
		t.Fatalf("logs %v (%d), %v", texts, res.Lines, err)
	}
	var apiErr *ctlapi.APIError
	if _, err := l.Follow(context.Background(), ctlapi.LogsRequest{Service: "shop/nope"}, func(ctlapi.LogLine) {}); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeUnknownService {
		t.Fatalf("unknown service: %v", err)
	}
}
