// Package facttest gives unit tests of the agent's parts a fact store in
// memory (the fsm applied directly, no Raft) and a gossip view they
// control. Only tests import it.
package facttest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// Store is the fsm behind a mutex, with the methods the parts read and
// apply through; every command goes through its wire form, as in Raft.
type Store struct {
	mu      sync.Mutex
	s       *fsm.State
	applied uint64
	changed chan struct{} // closed and replaced on every apply
	log     []fsm.Command
	// Fail, when set, refuses a command before it is applied.
	Fail func(fsm.Command) error
}

// NewStore is an empty store.
func NewStore() *Store { return &Store{s: fsm.NewState(), changed: make(chan struct{})} }

// Read calls fn with the facts; fn must not keep them.
func (st *Store) Read(fn func(*fsm.State)) {
	st.mu.Lock()
	defer st.mu.Unlock()
	fn(st.s)
}

// Apply applies one command as the leader would, and answers as
// cluster.Node does: the result as JSON, or the rule broken.
func (st *Store) Apply(_ context.Context, cmd fsm.Command) (json.RawMessage, error) {
	st.mu.Lock()
	fail := st.Fail
	st.mu.Unlock()
	if fail != nil {
		if err := fail(cmd); err != nil {
			return nil, err
		}
	}
	data, err := fsm.Encode(cmd)
	if err != nil {
		return nil, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	res, err := st.s.Apply(data)
	if err != nil {
		return nil, err
	}
	st.applied++
	close(st.changed)
	st.changed = make(chan struct{})
	st.log = append(st.log, cmd)
	return json.Marshal(res)
}

// CaughtUp: a store in memory always is.
func (st *Store) CaughtUp(context.Context) error { return nil }

// FactsIndex counts the commands applied.
func (st *Store) FactsIndex() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.applied
}

// FactsChanged is closed by the next command applied.
func (st *Store) FactsChanged() <-chan struct{} {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.changed
}

// Applied lists the commands applied so far.
func (st *Store) Applied() []fsm.Command {
	st.mu.Lock()
	defer st.mu.Unlock()
	return append([]fsm.Command(nil), st.log...)
}

// Must applies cmd or fails the test.
func (st *Store) Must(t testing.TB, cmd fsm.Command) json.RawMessage {
	t.Helper()
	res, err := st.Apply(context.Background(), cmd)
	if err != nil {
		t.Fatalf("applying %s: %v", cmd.Type(), err)
	}
	return res
}

// T0 is the time the helpers stamp on their commands.
var T0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// ServicePrefix is the service range of the helpers.
var ServicePrefix = netip.MustParsePrefix("10.211.0.0/16")

// AddMachine registers a machine with room for volumes and memory.
func (st *Store) AddMachine(t testing.TB, id, name string) {
	t.Helper()
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: id, Name: name, RPCAddr: "10.0.0.1:7948",
		Capacity: fsm.Capacity{MemoryBytes: 4 << 30, DiskBytes: 10 << 30}}, At: T0})
}

// Deploy puts a service on a machine, under a lock taken and released
// for it.
func (st *Store) Deploy(t testing.TB, ns string, spec fsm.ServiceSpec, machineID string) fsm.Service {
	t.Helper()
	st.Must(t, fsm.AcquireLock{Namespace: ns, Holder: "test/deploy", Lease: time.Hour, At: time.Now()})
	raw := st.Must(t, fsm.PutService{Namespace: ns, Holder: "test/deploy", Spec: spec, MachineID: machineID, ServicePrefix: ServicePrefix, At: time.Now()})
	st.Must(t, fsm.ReleaseLock{Namespace: ns, Holder: "test/deploy", At: time.Now()})
	var sv fsm.Service
	if err := json.Unmarshal(raw, &sv); err != nil {
		t.Fatal(err)
	}
	return sv
}

// Members is a gossip view the test sets.
type Members struct {
	mu     sync.Mutex
	byID   map[string]cluster.Member
	order  []string
	leader bool
}

// NewMembers sees every named machine (id=name pairs) alive.
func NewMembers(idName ...string) *Members {
	g := &Members{byID: map[string]cluster.Member{}}
	for i := 0; i+1 < len(idName); i += 2 {
		g.Set(idName[i], idName[i+1], cluster.LivenessAlive)
	}
	return g
}

// Set sets a machine's liveness as gossip sees it.
func (g *Members) Set(id, name string, l cluster.Liveness) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.byID[id]; !ok {
		g.order = append(g.order, id)
	}
	m, known := g.byID[id]
	if !known {
		m.Facts = cluster.FactsLevel // a daemon of this version
	}
	m.MachineID, m.Name, m.Liveness = id, name, l
	g.byID[id] = m
}

// SetFactsLevel sets the facts level a machine gossips (an older daemon
// gossips a lower one).
func (g *Members) SetFactsLevel(id string, level uint32) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := g.byID[id]
	m.Facts = level
	g.byID[id] = m
}

// SetMember replaces what gossip says of a machine.
func (g *Members) SetMember(m cluster.Member) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.byID[m.MachineID]; !ok {
		g.order = append(g.order, m.MachineID)
	}
	g.byID[m.MachineID] = m
}

// SetLeader makes this machine the Raft leader, or not.
func (g *Members) SetLeader(leader bool) {
	g.mu.Lock()
	g.leader = leader
	g.mu.Unlock()
}

// Member is what gossip says of one machine.
func (g *Members) Member(id string) (cluster.Member, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m, ok := g.byID[id]
	return m, ok
}

// Members lists every machine gossip knows, in the order they were set.
func (g *Members) Members() []cluster.Member {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]cluster.Member, 0, len(g.order))
	for _, id := range g.order {
		out = append(out, g.byID[id])
	}
	return out
}

// IsLeader tells what SetLeader said.
func (g *Members) IsLeader() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.leader
}

// String names the machines and their liveness, for failure messages.
func (g *Members) String() string {
	return fmt.Sprint(g.Members())
}
