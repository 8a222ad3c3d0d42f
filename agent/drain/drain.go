// Package drain takes a machine out of service: it plans a target for
// every service on it (a pure function of what it gathered), hands each
// move to the migration package with bounded parallelism, resumes a run
// after a restart from the facts, and ends it drained or incomplete with
// the reason for what stayed. See DESIGN.md.
package drain

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/migrate"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
}

// Members is gossip's view of the machines, and this machine's Raft role.
type Members interface {
	Member(id string) (cluster.Member, bool)
	Members() []cluster.Member
	IsLeader() bool
}

// Migrations runs the moves of a drain.
type Migrations interface {
	Migrate(ctx context.Context, req ctlapi.MigrateRequest, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error)
	// Cancel aborts a migration this daemon runs that did not commit.
	Cancel(id string, cause error) bool
	LocalFacts(ctx context.Context, machineID string, q migrate.LocalQuery) (migrate.LocalFacts, error)
	// Recovered is closed once this machine's orphaned migrations were
	// aborted or completed after a start.
	Recovered() <-chan struct{}
}

// Config is what a drainer needs to know of its machine.
type Config struct {
	Self string // this machine's id
	// ExecutorGrace is how long the leader waits for a drain's executor
	// that gossip sees gone before it ends the drain (the lock lease).
	ExecutorGrace time.Duration
	// Interval is how often drains to resume are looked for.
	Interval time.Duration
	Logger   *slog.Logger
	// Observer, when set, is told how each drain this machine ran ended.
	Observer interface{ DrainEnded(outcome string) }
}

// Drainer runs the drains this machine executes. It owns every goroutine
// it starts: Wait returns once they ended after the context given to New
// was cancelled.
type Drainer struct {
	cfg   Config
	facts Facts
	gos   Members
	migs  Migrations
	log   *slog.Logger
	ctx   context.Context

	mu   sync.Mutex
	runs map[string]*run // by drained machine's id
	wg   sync.WaitGroup
}

// New makes a drainer that lives as long as ctx.
func New(ctx context.Context, cfg Config, facts Facts, members Members, migs Migrations) *Drainer {
	return &Drainer{cfg: cfg, facts: facts, gos: members, migs: migs, log: cfg.Logger, ctx: ctx, runs: map[string]*run{}}
}

// Start starts resuming drains: those this machine ran before it
// restarted, and, on the leader, ending those whose executor is gone.
func (d *Drainer) Start() {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.resumeLoop(d.ctx)
	}()
}

// Wait waits for every goroutine of the drainer.
func (d *Drainer) Wait() { d.wg.Wait() }

// errDrainDeadline is the cause of the migrations a drain aborts when its
// deadline passes.
var errDrainDeadline = errors.New("the drain's deadline passed before the commit")

func (d *Drainer) nameOf(id string) string { return factview.NameOf(d.gos, d.facts, id) }

// Drain starts the drain of a machine, or follows the one that runs.
func (d *Drainer) Drain(ctx context.Context, req ctlapi.DrainRequest, emit func(ctlapi.DrainEvent)) (ctlapi.DrainInfo, error) {
	m, err := factview.MachineByName(d.facts, d.cfg.Self, req.Machine)
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	if req.Parallel == 0 {
		req.Parallel = 1
	}
	if req.Parallel < 0 || req.Deadline < 0 {
		return ctlapi.DrainInfo{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadRequest,
			Err: fmt.Errorf("drain of %s: --parallel %d and --deadline %s must not be negative", m.Name, req.Parallel, time.Duration(req.Deadline))}
	}
	if req.DryRun {
		items := d.plan(ctx, m, nil, nil)
		info := d.Info(fsm.Drain{MachineID: m.ID, Parallel: req.Parallel, Items: items})
		info.State = "planned"
		return info, nil
	}
	f, known := d.fact(m.ID)
	if !known || f.State != fsm.DrainRunning {
		if m.State == fsm.MachineGone {
			return ctlapi.DrainInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeMachineGone, Err: fmt.Errorf("machine %s is gone: remove it with `droverctl machine rm %s`", m.Name, m.Name)}
		}
		f = fsm.Drain{MachineID: m.ID, Executor: d.cfg.Self, Parallel: req.Parallel, Items: d.plan(ctx, m, nil, nil)}
		if req.Deadline > 0 {
			f.Deadline = time.Now().Add(time.Duration(req.Deadline))
		}
		raw, err := d.facts.Apply(ctx, fsm.StartDrain{Drain: f, At: time.Now()})
		if err != nil {
			return ctlapi.DrainInfo{}, fmt.Errorf("starting the drain of %s: %w", m.Name, err)
		}
		if err := json.Unmarshal(raw, &f); err != nil {
			return ctlapi.DrainInfo{}, fmt.Errorf("starting the drain of %s: reading the result: %w", m.Name, err)
		}
		d.log.Info("drain started", "machine", m.Name, "services", len(f.Items), "parallel", f.Parallel, "deadline", f.Deadline)
		d.startRun(m.ID)
	}
	if !req.Wait {
		return d.Info(f), nil
	}
	return d.follow(ctx, m.ID, emit)
}

// Status gives a machine's latest drain.
func (d *Drainer) Status(_ context.Context, machine string) (ctlapi.DrainInfo, error) {
	m, err := factview.MachineByName(d.facts, d.cfg.Self, machine)
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	f, ok := d.fact(m.ID)
	if !ok {
		return ctlapi.DrainInfo{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeNoDrain, Err: fmt.Errorf("machine %s was never drained", m.Name)}
	}
	return d.Info(f), nil
}

func (d *Drainer) fact(machineID string) (fsm.Drain, bool) {
	var f fsm.Drain
	var ok bool
	d.facts.Read(func(s *fsm.State) { f, ok = s.Drain(machineID) })
	return f, ok
}

// Info describes a drain as the operator sees it.
func (d *Drainer) Info(f fsm.Drain) ctlapi.DrainInfo {
	out := ctlapi.DrainInfo{Machine: d.nameOf(f.MachineID), Executor: d.nameOf(f.Executor), State: string(f.State),
		Parallel: f.Parallel, Deadline: f.Deadline, StartedAt: f.StartedAt, EndedAt: f.EndedAt, Note: f.Note, Items: []ctlapi.DrainItem{}}
	for _, it := range f.Items {
		out.Items = append(out.Items, ctlapi.DrainItem{Service: it.Service, Target: d.nameOf(it.Target), State: string(it.State), Migration: it.Migration, Reason: it.Reason})
		if it.State == fsm.ItemMoved {
			out.Moved++
		}
	}
	out.Left = len(f.Items) - out.Moved
	return out
}

// follow passes a drain's events to emit until it ends: the rich ones
// (migration progress) when this daemon runs it, else the changes of its
// facts.
func (d *Drainer) follow(ctx context.Context, machineID string, emit func(ctlapi.DrainEvent)) (ctlapi.DrainInfo, error) {
	d.mu.Lock()
	r := d.runs[machineID]
	d.mu.Unlock()
	var events <-chan ctlapi.DrainEvent
	var done <-chan struct{}
	if r != nil {
		ch, unsubscribe := r.subscribe()
		defer unsubscribe()
		events, done = ch, r.done
	}
	last := map[string]fsm.DrainItemState{}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		f, _ := d.fact(machineID)
		if r == nil {
			for _, it := range f.Items {
				if last[it.Service] != it.State {
					last[it.Service] = it.State
					emit(ctlapi.DrainEvent{Time: time.Now(), Service: it.Service, Target: d.nameOf(it.Target), State: string(it.State), Message: it.Reason})
				}
			}
		}
		if f.State != fsm.DrainRunning && (r == nil || isClosed(done)) {
			info := d.Info(f)
			if f.State != fsm.DrainDrained {
				return info, &ctlapi.APIError{Status: http.StatusConflict, Code: endedCode(f.State),
					Err: fmt.Errorf("drain of %s ended %s: %s", info.Machine, f.State, leftover(info))}
			}
			return info, nil
		}
		select {
		case ev := <-events:
			emit(ev)
		case <-done:
			done = nil
		case <-tick.C:
		case <-ctx.Done():
			f, _ := d.fact(machineID)
			return d.Info(f), fmt.Errorf("stopped following the drain of %s; it goes on (see `droverctl machine ls`): %w", d.nameOf(machineID), ctx.Err())
		}
	}
}

// endedCode is the control API's code of a drain that ended other than
// drained.
func endedCode(s fsm.DrainState) string {
	if s == fsm.DrainCancelled {
		return ctlapi.CodeDrainCancelled
	}
	return ctlapi.CodeDrainIncomplete
}

func isClosed(ch <-chan struct{}) bool {
	if ch == nil {
		return true
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// leftover says what a drain left on its machine, and why.
func leftover(info ctlapi.DrainInfo) string {
	var parts []string
	for _, it := range info.Items {
		if it.State != string(fsm.ItemMoved) {
			parts = append(parts, fmt.Sprintf("%s %s (%s)", it.Service, it.State, it.Reason))
		}
	}
	s := fmt.Sprintf("%d of %d services left", info.Left, len(info.Items))
	if info.Note != "" {
		s = info.Note + "; " + s
	}
	if len(parts) > 0 {
		s += ": " + strings.Join(parts, "; ")
	}
	return s
}
