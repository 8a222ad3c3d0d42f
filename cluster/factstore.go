package cluster

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
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
// pure fsm.State and halts on entries it cannot decode. On a machine that
// follows the facts from a server instead of taking part in Raft, the
// same store applies the entries the server streams (follow.go).
type factStore struct {
	mu     sync.RWMutex
	state  *fsm.State
	halted error
	onHalt func(error)

	applied atomic.Uint64
	// appliedMu guards appliedCh, closed and replaced after every entry.
	appliedMu sync.Mutex
	appliedCh chan struct{}

	// journal is the recent commands, oldest first, for the machines that
	// follow this one's facts (guarded by mu).
	journal      []journalEntry
	journalBytes int
	// fromRaft is the highest index Raft has handed this store (applied
	// or already there): a machine that followed the facts before it
	// became a Raft server stops following once Raft reaches what it has.
	fromRaft atomic.Uint64
	// restoring is the log index of the snapshot Raft is about to
	// restore (set by indexedSnapshots.Open), 0 when unknown.
	restoring atomic.Uint64

	// onChange, when set, is called with each command that changed the
	// facts and the state after it, under the store's lock: it must be
	// quick and must not keep the state.
	onChange func(index uint64, c fsm.Command, s *fsm.State)
}

// journalEntry is one applied command as followers receive it; prev is
// the store's index before it (indexes of barriers and configuration
// entries lie between).
type journalEntry struct {
	prev, index uint64
	data        []byte
}

// The journal keeps the last commands up to both bounds: a follower that
// is further behind gets a snapshot.
const (
	journalMaxEntries = 4096
	journalMaxBytes   = 16 << 20
)

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
// waiters. The index never goes back.
func (f *factStore) markApplied(index uint64) {
	if index > f.applied.Load() {
		f.applied.Store(index)
	}
	f.wake()
}

// wake wakes whoever waits on appliedChanged.
func (f *factStore) wake() {
	f.appliedMu.Lock()
	close(f.appliedCh)
	f.appliedCh = make(chan struct{})
	f.appliedMu.Unlock()
}

// Apply applies one committed log entry.
func (f *factStore) Apply(l *raft.Log) any {
	if l.Index > f.fromRaft.Load() {
		f.fromRaft.Store(l.Index)
	}
	if l.Type != raft.LogCommand {
		f.markApplied(l.Index)
		return applyResult{}
	}
	return f.applyEntry(l.Index, l.Data)
}

// applyEntry applies the command at index, once: an index the store has
// already reached (a machine that followed the facts and then joined
// Raft gets the log again from Raft) changes nothing.
func (f *factStore) applyEntry(index uint64, data []byte) applyResult {
	f.mu.Lock()
	if index <= f.applied.Load() {
		f.mu.Unlock()
		return applyResult{}
	}
	res := f.applyLocked(index, data)
	f.mu.Unlock()
	f.markApplied(index)
	return res
}

func (f *factStore) applyLocked(index uint64, data []byte) applyResult {
	if f.halted != nil {
		return applyResult{Fatal: f.halted.Error()}
	}
	c, err := fsm.Decode(data)
	var value any
	if err == nil {
		value, err = f.state.ApplyCommand(c)
	}
	var rule *fsm.RuleError
	switch {
	case errors.As(err, &rule):
		f.record(index, data)
		return applyResult{Rule: rule}
	case err != nil:
		f.halted = fmt.Errorf("log index %d: %w", index, err)
		f.onHalt(f.halted)
		return applyResult{Fatal: f.halted.Error()}
	}
	f.record(index, data)
	if f.onChange != nil {
		f.onChange(index, c, f.state)
	}
	if value == nil {
		return applyResult{}
	}
	raw, err := json.Marshal(value)
	if err != nil {
		// A result the fsm produced but cannot be encoded is a bug in fsm;
		// the state changed, so report it rather than pretend otherwise.
		return applyResult{Fatal: fmt.Sprintf("encoding result of log index %d: %v", index, err)}
	}
	return applyResult{Value: raw}
}

// record appends an applied command to the journal, under mu.
func (f *factStore) record(index uint64, data []byte) {
	f.journal = append(f.journal, journalEntry{prev: f.applied.Load(), index: index, data: slices.Clone(data)})
	f.journalBytes += len(data)
	drop := 0
	for len(f.journal)-drop > journalMaxEntries || (f.journalBytes > journalMaxBytes && len(f.journal)-drop > 1) {
		f.journalBytes -= len(f.journal[drop].data)
		drop++
	}
	if drop > 0 {
		f.journal = slices.Delete(f.journal, 0, drop)
	}
}

// followFrom is what a follower whose facts reach index after lacks: the
// journal's commands after it, or, when the journal does not reach back
// that far, a copy of the state and the index it is at. Nothing when the
// follower is as far as this store, or further.
func (f *factStore) followFrom(after uint64) (entries []journalEntry, snap *fsm.State, snapIndex uint64, err error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.halted != nil {
		return nil, nil, 0, fmt.Errorf("%w: %v", ErrHalted, f.halted)
	}
	applied := f.applied.Load()
	if after >= applied {
		return nil, nil, 0, nil
	}
	i, _ := slices.BinarySearchFunc(f.journal, after+1, func(e journalEntry, idx uint64) int { return cmp.Compare(e.index, idx) })
	if i < len(f.journal) && f.journal[i].prev <= after {
		return slices.Clone(f.journal[i:]), nil, 0, nil
	}
	return nil, f.state.Clone(), applied, nil
}

// restoreFollowed replaces the state with a server's copy at index,
// unless the store is there already.
func (f *factStore) restoreFollowed(index uint64, st *fsm.State) {
	f.mu.Lock()
	if index <= f.applied.Load() {
		f.mu.Unlock()
		return
	}
	f.state = st
	f.journal, f.journalBytes = nil, 0
	f.mu.Unlock()
	f.markApplied(index)
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

// Restore replaces the state with the one in the snapshot, built fresh —
// unless the store already holds every entry the snapshot covers (a
// machine that followed the facts before it joined Raft).
func (f *factStore) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	index := f.restoring.Swap(0)
	if index != 0 && index <= f.applied.Load() {
		f.fromRaft.Store(max(f.fromRaft.Load(), index))
		return nil
	}
	st, err := fsm.ReadSnapshot(rc)
	if err != nil {
		return fmt.Errorf("restoring fact store: %w", err)
	}
	f.mu.Lock()
	f.state = st
	f.journal, f.journalBytes = nil, 0
	f.mu.Unlock()
	if index != 0 {
		f.fromRaft.Store(max(f.fromRaft.Load(), index))
		f.markApplied(index)
	}
	return nil
}

// indexedSnapshots tells the fact store the index of the snapshot Raft
// opens, which raft.FSM.Restore is not given: Raft opens a snapshot just
// before it restores it, on the same goroutine.
type indexedSnapshots struct {
	raft.SnapshotStore
	facts *factStore
}

func (s *indexedSnapshots) Open(id string) (*raft.SnapshotMeta, io.ReadCloser, error) {
	meta, rc, err := s.SnapshotStore.Open(id)
	if err == nil {
		s.facts.restoring.Store(meta.Index)
	}
	return meta, rc, err
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
