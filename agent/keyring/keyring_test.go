package keyring

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// machineKeys is one machine's gossip keyring as the fake sees it; it
// gossips its generation into the shared member view, as the real node
// does in its metadata.
type machineKeys struct {
	id, name string
	view     *facttest.Members
	mu       sync.Mutex
	keys     [][]byte
	frozen   bool // a machine that never installs anything
	history  [][][]byte
}

func (m *machineKeys) GossipKeys() [][]byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.keys
}

func (m *machineKeys) InstallKeyring(keys [][]byte, gen uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.frozen {
		return errors.New("frozen")
	}
	m.keys = keys
	m.history = append(m.history, keys)
	m.view.SetMember(cluster.Member{Meta: cluster.Meta{MachineID: m.id, Name: m.name, KeyGen: gen}, Liveness: cluster.LivenessAlive})
	return nil
}

func (m *machineKeys) installs() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.history)
}

func (m *machineKeys) Members() []cluster.Member { return m.view.Members() }

func key(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// cluster3 is three machines a, b, c on old key 1, each with a keeper
// that follows the shared facts.
func cluster3(t *testing.T) (*facttest.Store, []*machineKeys, func()) {
	st := facttest.NewStore()
	view := facttest.NewMembers("a", "a", "b", "b", "c", "c")
	var machines []*machineKeys
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, id := range []string{"a", "b", "c"} {
		st.AddMachine(t, id, id)
		m := &machineKeys{id: id, name: id, view: view, keys: [][]byte{key(1)}}
		machines = append(machines, m)
		k := &Keeper{Facts: st, Gossip: m, Save: func([][]byte) error { return nil }, Logger: logger, Interval: 5 * time.Millisecond}
		wg.Add(1)
		go func() { defer wg.Done(); k.Run(ctx) }()
	}
	return st, machines, func() { cancel(); wg.Wait() }
}

func TestRotateInstallsThenSwitchesThenRetires(t *testing.T) {
	st, machines, stop := cluster3(t)
	defer stop()
	r := &Rotator{Facts: st, Gossip: machines[0], Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		StepTimeout: 5 * time.Second, NewKey: func() ([]byte, error) { return key(2), nil }}
	out, err := r.Rotate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if out.Generation != 3 || len(out.Confirmed) != 3 || out.NewKey != Fingerprint(key(2)) || out.OldKey != Fingerprint(key(1)) {
		t.Fatalf("rotation %+v", out)
	}
	// Every machine went through the three keyrings in order: at no
	// moment did one encrypt with a key another could not read.
	want := [][][]byte{{key(1), key(2)}, {key(2), key(1)}, {key(2)}}
	for _, m := range machines {
		if len(m.history) != 3 {
			t.Fatalf("%s installed %d keyrings", m.name, len(m.history))
		}
		for i := range want {
			for j := range want[i] {
				if !bytes.Equal(m.history[i][j], want[i][j]) {
					t.Fatalf("%s step %d: keyring %v", m.name, i, m.history[i])
				}
			}
		}
	}
}

func TestRotateStopsWhenALiveMachineDoesNotConfirm(t *testing.T) {
	st, machines, stop := cluster3(t)
	defer stop()
	machines[2].frozen = true
	r := &Rotator{Facts: st, Gossip: machines[0], Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		StepTimeout: 300 * time.Millisecond, NewKey: func() ([]byte, error) { return key(2), nil }}
	_, err := r.Rotate(context.Background())
	if !errors.Is(err, ErrNotConfirmed) {
		t.Fatalf("got %v, want ErrNotConfirmed", err)
	}
	// It stopped after the first step: the old key is still the primary.
	var kr fsm.Keyring
	st.Read(func(s *fsm.State) { kr = s.Keyring() })
	if kr.Generation != 1 || !bytes.Equal(kr.Keys[0], key(1)) {
		t.Fatalf("keyring after the failed rotation: %+v", kr)
	}
}

func TestRotateSkipsMachinesThatAreNotAlive(t *testing.T) {
	st, machines, stop := cluster3(t)
	defer stop()
	machines[2].frozen = true
	machines[0].view.Set("c", "c", cluster.LivenessFailed)
	r := &Rotator{Facts: st, Gossip: machines[0], Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		StepTimeout: 5 * time.Second, NewKey: func() ([]byte, error) { return key(2), nil }}
	out, err := r.Rotate(context.Background())
	if err != nil || len(out.NotAlive) != 1 || out.NotAlive[0] != "c" || len(out.Confirmed) != 2 {
		t.Fatalf("rotation %+v, %v", out, err)
	}
}

// The keeper looks at the facts when they change; a keyring it failed to
// save is tried again on the interval, with no further change.
func TestKeeperRetriesAKeyringItFailedToInstall(t *testing.T) {
	st := facttest.NewStore()
	m := &machineKeys{id: "a", name: "a", view: facttest.NewMembers("a", "a"), keys: [][]byte{key(1)}}
	var saves atomic.Int32
	k := &Keeper{Facts: st, Gossip: m, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Interval: 10 * time.Millisecond,
		Save: func([][]byte) error {
			if saves.Add(1) < 3 {
				return errors.New("disk full")
			}
			return nil
		}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); k.Run(ctx) }()
	defer func() { cancel(); <-done }()

	st.Must(t, fsm.SetKeyring{Keys: [][]byte{key(2), key(1)}, At: time.Now()})
	deadline := time.Now().Add(5 * time.Second)
	for m.installs() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the keyring was not installed after %d saves", saves.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := saves.Load(); n != 3 {
		t.Fatalf("%d saves, want 3 (two failed)", n)
	}
}
