// Package migrate moves a running service and its volumes to another
// machine: the executor that drives a migration's phases, the source's
// and the target's sides of it, the volume stream between them, the
// pre-flight, the recovery of migrations whose daemons restarted, and
// rollback and purge. See DESIGN.md.
package migrate

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/internal/crashpoint"
)

// Config is what a migrator needs to know of its machine.
type Config struct {
	// Observer, when set, is told how each migration this machine
	// executed ended (agent/metrics).
	Observer interface {
		MigrationEnded(outcome string, took, downtime time.Duration, bytes uint64)
	}
	Self string // this machine's id
	Name string // this machine's name: lock holders start with it

	// LockLease is the lease of the namespace lock an executor holds.
	LockLease time.Duration
	// StallTimeout fails a volume stream that moved no byte for this long.
	StallTimeout time.Duration
	// SafetyWindow is how long a source keeps its copy after a move.
	SafetyWindow time.Duration
	// JanitorInterval is how often recovery looks for what needs it.
	JanitorInterval time.Duration

	Logger *slog.Logger
	Crash  *crashpoint.Points // nil: none
	// MemAvailable reports this machine's free memory (pre-flight).
	MemAvailable func() uint64
}

// Deps are the parts of the daemon a migrator works with. A machine
// without volumes leaves Streams, Datasets and Copies nil.
type Deps struct {
	Facts      Facts
	Members    Members
	Peers      peer.Caller
	Server     peer.Server
	Streams    Streams
	Datasets   Datasets
	Copies     Copies
	Containers Containers
	Starter    Starter
	Images     Images
	Loopback   Loopback
	// Holder, when set and able, holds the target's container started
	// before the cutover; nil: the target starts it at the cutover.
	Holder Holder
}

// Migrator runs the migrations this machine executes and serves its
// part of everyone's. It owns every goroutine it starts: Wait returns once
// they all ended after the context given to New was cancelled.
type Migrator struct {
	cfg Config
	d   Deps
	log *slog.Logger
	ctx context.Context // the daemon's time in the cluster

	mu    sync.Mutex
	execs map[string]*execution // migrations this daemon runs, by id
	// inPlace: the volumes, by "<migration>/<volume>", whose copies this
	// machine put in place as a migration's target since it started; the
	// final increment is received there without asking ZFS again.
	inPlace map[string]bool
	// stopping: per migration this machine is the source of, closed once
	// the engine's stop of the source container, left to finish after
	// the cutover, is over.
	stopping map[string]chan struct{}

	recovered chan struct{} // closed after recovery's first pass
	wg        sync.WaitGroup

	// lookupWait bounds how long a call waits for this machine to learn
	// of the migration it names (10 s; tests shorten it).
	lookupWait time.Duration
}

// New makes a migrator that lives as long as ctx.
func New(ctx context.Context, cfg Config, d Deps) *Migrator {
	if cfg.MemAvailable == nil {
		cfg.MemAvailable = func() uint64 { return 0 }
	}
	return &Migrator{cfg: cfg, d: d, log: cfg.Logger, ctx: ctx, execs: map[string]*execution{}, inPlace: map[string]bool{}, stopping: map[string]chan struct{}{}, recovered: make(chan struct{}), lookupWait: 10 * time.Second}
}

// Start starts recovery (and the crash watch of test builds).
func (m *Migrator) Start() {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.runRecovery(m.ctx)
	}()
	if m.cfg.Crash.Enabled() {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.watchCrashPhases(m.ctx)
		}()
	}
}

// Wait waits for every goroutine of the migrator; cancel its context
// first.
func (m *Migrator) Wait() { m.wg.Wait() }

// Recovered is closed once recovery has made its first pass: migrations
// this machine ran before a restart are aborted or completed by then.
func (m *Migrator) Recovered() <-chan struct{} { return m.recovered }

// holdsVolumes tells whether this machine has a ZFS parent.
func (m *Migrator) holdsVolumes() bool { return m.d.Datasets != nil }

// requireVolumes is ErrNoVolumes unless this machine holds volumes.
func (m *Migrator) requireVolumes() error {
	if !m.holdsVolumes() {
		return ErrNoVolumes
	}
	return nil
}

// running tells which migrations this daemon runs now.
func (m *Migrator) running() map[string]bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]bool, len(m.execs))
	for id := range m.execs {
		out[id] = true
	}
	return out
}

// execution gives the running execution of a migration here, or nil.
func (m *Migrator) execution(id string) *execution {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.execs[id]
}

// Cancel stops a migration this daemon runs if it is not committed yet;
// it aborts with cause. It tells whether there was one to stop.
func (m *Migrator) Cancel(id string, cause error) bool {
	ex := m.execution(id)
	if ex == nil {
		return false
	}
	if f, ok := m.fact(id); !ok || f.Phase.Committed() {
		return false
	}
	ex.cancel(cause)
	return true
}

// errAbortedByOperator is the cause of an abort asked with `migrate abort`
// or Ctrl-C.
var errAbortedByOperator = errors.New("aborted by the operator")
