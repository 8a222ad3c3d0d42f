package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/drover-sh/drover/fsm"
	"github.com/hashicorp/raft"
)

// applyResult is what the fact store returns for each applied log entry,
// and what the leader sends back to a machine that forwarded a command.
type applyResult struct {
	Value json.RawMessage `json:"value,omitempty"`
	Rule  *fsm.RuleError  `json:"rule_error,omitempty"`
	Fatal string          `json:"fatal,omitempty"`
	Index uint64          `json:"index,omitempty"`
}

// ErrHalted means this machine's fact store met a log entry it cannot
// decode and stopped applying: its state must not diverge from the
// others', so it takes no further part until an operator looks.
var ErrHalted = errors.New("fact store halted on an undecodable command")

func (r applyResult) err() error {
	switch {
	case r.Rule != nil:
		return r.Rule
	case r.Fatal != "":
		return fmt.Errorf("%w: %s", ErrHalted, r.Fatal)
	}
	return nil
}

// factStore is the raft.FSM: a thin shell that serialises access to the
// pure fsm.State and halts on entries it cannot decode.
type factStore struct {
	mu     sync.RWMutex
	state  *fsm.State
	halted error
	onHalt func(error)

	applied atomic.Uint64
	// appliedMu guards appliedCh, closed and replaced after every entry.
	appliedMu sync.Mutex
	appliedCh chan struct{}

	// onChange, when set, is called with each command that changed the
	// facts and the state after it, under the store's lock: it must be
	// quick and must not keep the state.
	onChange func(index uint64, c fsm.Command, s *fsm.State)
}

func newFactStore(onHalt func(error), onChange func(uint64, fsm.Command, *fsm.State)) *factStore {
	return &factStore{state: fsm.NewState(), onHalt: onHalt, onChange: onChange, appliedCh: make(chan struct{})}
}

// appliedChanged is closed when the store applies its next entry: read
// it before applied, then wait on it.
func (f *factStore) appliedChanged() <-chan struct{} {
	f.appliedMu.Lock()
	defer f.appliedMu.Unlock()
	return f.appliedCh
}

// markApplied records the index of the entry just applied and wakes its
// waiters.
func (f *factStore) markApplied(index uint64) {
	f.applied.Store(index)
	f.appliedMu.Lock()
	close(f.appliedCh)
	f.appliedCh = make(chan struct{})
	f.appliedMu.Unlock()
}

// Apply applies one committed log entry.
func (f *factStore) Apply(l *raft.Log) any {
	defer f.markApplied(l.Index)
	if l.Type != raft.LogCommand {
		return applyResult{}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.halted != nil {
		return applyResult{Fatal: f.halted.Error()}
	}
	c, err := fsm.Decode(l.Data)
	var value any
	if err == nil {
		value, err = f.state.ApplyCommand(c)
	}
	var rule *fsm.RuleError
	switch {
	case errors.As(err, &rule):
		return applyResult{Rule: rule}
	case err != nil:
		f.halted = fmt.Errorf("log index %d: %w", l.Index, err)
		f.onHalt(f.halted)
		return applyResult{Fatal: f.halted.Error()}
	}
	if f.onChange != nil {
		f.onChange(l.Index, c, f.state)
	}
	if value == nil {
		return applyResult{}
	}
	raw, err := json.Marshal(value)
	if err != nil {
		// A result the fsm produced but cannot be encoded is a bug in fsm;
		// the state changed, so report it rather than pretend otherwise.
		return applyResult{Fatal: fmt.Sprintf("encoding result of log index %d: %v", l.Index, err)}
	}
	return applyResult{Value: raw}
}

// Snapshot captures a copy of the state; Persist runs while Apply goes on.
func (f *factStore) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.halted != nil {
		return nil, fmt.Errorf("no snapshot of a halted fact store: %w", f.halted)
	}
	return &factSnapshot{state: f.state.Clone()}, nil
}

// Restore replaces the state with the one in the snapshot, built fresh.
func (f *factStore) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := fsm.ReadSnapshot(rc)
	if err != nil {
		return fmt.Errorf("restoring fact store: %w", err)
	}
	f.mu.Lock()
	f.state = st
	f.mu.Unlock()
	return nil
}

// read gives fn the current state under the read lock; fn must not keep it.
func (f *factStore) read(fn func(*fsm.State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

type factSnapshot struct{ state *fsm.State }

func (s *factSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := s.state.WriteSnapshot(sink); err != nil {
		sink.Cancel()
		return fmt.Errorf("writing fact snapshot: %w", err)
	}
	return sink.Close()
}

func (s *factSnapshot) Release() {}
