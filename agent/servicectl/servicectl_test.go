package servicectl

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
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// fakeRuntime is one machine's engine with the service's container.
type fakeRuntime struct {
	mu      sync.Mutex
	running bool
	actions []string
}

func (f *fakeRuntime) List(context.Context) ([]runtime.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return []runtime.Container{{ID: "c1", Namespace: "shop", Service: "web", Running: f.running}}, nil
}

func (f *fakeRuntime) Stop(_ context.Context, id string, grace time.Duration) (runtime.Stopped, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.running = false
	f.actions = append(f.actions, "stop "+id+" "+grace.String())
	return runtime.Stopped{}, nil
}

func (f *fakeRuntime) Restart(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.running = true
	f.actions = append(f.actions, "start "+id)
	return nil
}

func (f *fakeRuntime) WriteSecrets(r runtime.RunSpec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.actions = append(f.actions, fmt.Sprintf("secrets %d", len(r.Spec.Secrets)))
	return nil
}

func (f *fakeRuntime) WaitReady(context.Context, runtime.Container, runtime.RunSpec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.running {
		return errors.New("not running")
	}
	return nil
}

func TestRestartRunsWhereTheServiceRunsUnderTheLock(t *testing.T) {
	facts, members, net := facttest.NewStore(), facttest.NewMembers(), peertest.New(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	engines := map[string]*fakeRuntime{}
	svcs := map[string]*Services{}
	for _, id := range []string{"a", "b"} {
		facts.AddMachine(t, id, id)
		members.Set(id, id, "alive")
		h := net.Add(id)
		engines[id] = &fakeRuntime{running: true}
		svcs[id] = New(Config{Self: id, Name: id, LockLease: time.Minute, Logger: quiet}, facts, members, h, engines[id], nil)
		svcs[id].Register(peer.Server{Mux: h, IDs: h})
	}
	spec := fsm.ServiceSpec{Name: "web", Image: "img", StopTimeout: 20 * time.Second}
	facts.Deploy(t, "shop", spec, "a")

	r, err := svcs["b"].Restart(context.Background(), "shop/web")
	if err != nil || r.Machine != "a" || r.Service != "shop/web" {
		t.Fatalf("restart from b: %+v, %v", r, err)
	}
	if got := strings.Join(engines["a"].actions, ", "); got != "stop c1 20s, start c1" || len(engines["b"].actions) != 0 {
		t.Fatalf("a did %q, b did %v", got, engines["b"].actions)
	}
	var lock fsm.Lock
	var held bool
	facts.Read(func(s *fsm.State) { lock, held = s.Lock("shop") })
	if held {
		t.Fatalf("the lock is still held by %s", lock.Holder)
	}

	// A namespace locked by a move or a deploy: refused, nothing done.
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "c/migrate/m1", Lease: time.Minute, At: time.Now()})
	var apiErr *ctlapi.APIError
	if _, err := svcs["b"].Restart(context.Background(), "shop/web"); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeNamespaceLocked {
		t.Fatalf("restart while locked: %v", err)
	}
	// The owner refuses a restart whose caller does not hold the lock.
	if _, err := routeRestart.Call(context.Background(), net.Add("c"), "a", restartRequest{Namespace: "shop", Service: "web", Holder: "c/restart/web"}); !errors.Is(err, ErrNotLocked) {
		t.Fatalf("a restart without the lock: %v", err)
	}
	if len(engines["a"].actions) != 2 {
		t.Fatalf("refused restarts did something: %v", engines["a"].actions)
	}
	if _, err := svcs["b"].Restart(context.Background(), "shop/nope"); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeUnknownService {
		t.Fatalf("unknown service: %v", err)
	}
}
