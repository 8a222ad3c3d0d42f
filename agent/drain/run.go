package drain

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// attempts bounds the migrations a drain starts for one service: a
// migration aborted because a machine restarted is worth another try, one
// that keeps failing is reported.
const attempts = 3

// run is a drain this daemon runs. Followers subscribe to its events;
// the drain's state itself is in the facts.
type run struct {
	machineID string
	mu        sync.Mutex
	subs      map[chan ctlapi.DrainEvent]struct{}
	done      chan struct{} // closed when the run stopped
}

func (r *run) subscribe() (<-chan ctlapi.DrainEvent, func()) {
	ch := make(chan ctlapi.DrainEvent, 256)
	r.mu.Lock()
	r.subs[ch] = struct{}{}
	r.mu.Unlock()
	return ch, func() {
		r.mu.Lock()
		delete(r.subs, ch)
		r.mu.Unlock()
	}
}

func (r *run) emit(ev ctlapi.DrainEvent) {
	ev.Time = time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for ch := range r.subs {
		select {
		case ch <- ev:
		default: // a slow follower loses progress lines, never the drain
		}
	}
}

// startRun runs a drain of the facts in a goroutine the drainer owns,
// unless one runs here already.
func (d *Drainer) startRun(machineID string) {
	d.mu.Lock()
	if d.runs[machineID] != nil {
		d.mu.Unlock()
		return
	}
	r := &run{machineID: machineID, subs: map[chan ctlapi.DrainEvent]struct{}{}, done: make(chan struct{})}
	d.runs[machineID] = r
	d.mu.Unlock()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() {
			d.mu.Lock()
			delete(d.runs, machineID)
			d.mu.Unlock()
			close(r.done)
		}()
		d.drive(d.ctx, r)
	}()
}

// step is what a migration goroutine of a drain reports back.
type step struct {
	service   string
	migration string // empty when it did not start
	err       error  // why it did not start, or why it aborted
}

// driver is one run of a drain on this daemon: what it keeps between
// rounds beyond the facts.
type driver struct {
	d           *Drainer
	r           *run
	name        string                     // of the drained machine
	starting    map[string]bool            // services whose migration goroutine runs
	failedOn    map[string]map[string]bool // per service, targets that refused it
	steps       chan step
	wg          sync.WaitGroup // the migration goroutines
	deadlineHit bool
}

// drive drives a drain from its facts until it ends. Each round it
// brings every service's state in line with the facts (a service no
// longer on the machine moved; one with a running migration migrates; one
// whose migration aborted is tried again, up to attempts, on another
// target when possible), starts migrations up to the parallelism, and
// after the deadline starts none and aborts those not committed yet.
// Since the state is read from the facts, a restarted daemon resumes
// where it was.
func (d *Drainer) drive(ctx context.Context, r *run) {
	v := &driver{d: d, r: r, name: d.nameOf(r.machineID), starting: map[string]bool{},
		failedOn: map[string]map[string]bool{}, steps: make(chan step)}
	defer v.wg.Wait()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		f, ok := d.fact(r.machineID)
		if !ok || f.State != fsm.DrainRunning || f.Executor != d.cfg.Self {
			if len(v.starting) == 0 {
				return
			}
		} else if v.round(ctx, f) {
			return
		}
		select {
		case st := <-v.steps:
			delete(v.starting, st.service)
			if st.err != nil {
				d.noteFailure(r.machineID, st, v.failedOn, func(it fsm.DrainItem) { v.update(ctx, it) })
			}
		case <-tick.C:
		case <-ctx.Done():
			return
		}
	}
}

// update records an item's new state and tells the followers.
func (v *driver) update(ctx context.Context, it fsm.DrainItem) {
	if _, err := v.d.facts.Apply(ctx, fsm.UpdateDrainItem{MachineID: v.r.machineID, Item: it, At: time.Now()}); err != nil {
		v.d.log.Warn("recording a drain step", "machine", v.name, "service", it.Service, "err", err)
		return
	}
	if it.State == fsm.ItemPending && it.Reason == "" {
		return // bookkeeping (an attempt counted), nothing to tell
	}
	v.r.emit(ctlapi.DrainEvent{Service: it.Service, Target: v.d.nameOf(it.Target), State: string(it.State), Message: it.Reason})
}

// round is one pass over the drain's items; it tells whether the drain
// ended.
func (v *driver) round(ctx context.Context, f fsm.Drain) bool {
	if !f.Deadline.IsZero() && !time.Now().Before(f.Deadline) && !v.deadlineHit {
		v.deadlineHit = true
		v.d.log.Warn("drain deadline passed: starting no more migrations, aborting those not committed", "machine", v.name)
		v.r.emit(ctlapi.DrainEvent{Message: "deadline passed: no new migrations; running ones abort unless committed"})
		for _, it := range f.Items {
			if it.State == fsm.ItemMigrating {
				v.d.migs.Cancel(it.Migration, errDrainDeadline) // those of other executors end by their own leases
			}
		}
	}
	var items []fsm.DrainItem
	v.d.facts.Read(func(s *fsm.State) { items = reconcileItems(s, f, v.starting) })
	inflight := len(v.starting)
	for _, it := range items {
		if it.State == fsm.ItemMigrating && !v.starting[it.Service] {
			inflight++
		}
	}
	open := 0
	for i, it := range items {
		if it != f.Items[i] {
			v.update(ctx, it)
		}
		switch it.State {
		case fsm.ItemPending:
			if v.pending(ctx, f, it, &inflight) {
				open++
			}
		case fsm.ItemMigrating:
			open++
		}
	}
	if open == 0 && len(v.starting) == 0 {
		v.d.end(ctx, v.r, f, v.deadlineHit)
		return true
	}
	return false
}

// pending handles an item not started yet: skipped after the deadline,
// else started when the parallelism allows (re-planned first if it has
// no target or its target refused it). It tells whether the item is still
// open.
func (v *driver) pending(ctx context.Context, f fsm.Drain, it fsm.DrainItem, inflight *int) bool {
	if v.deadlineHit {
		it.State, it.Reason = fsm.ItemSkipped, strings.TrimSuffix("the deadline passed; "+it.Reason, "; ")
		v.update(ctx, it)
		return false
	}
	if *inflight >= f.Parallel || v.starting[it.Service] || v.namespaceBusy(it.Service) {
		return true
	}
	if it.Target == "" || v.failedOn[it.Service][it.Target] {
		it = v.d.replan(ctx, f.MachineID, it, v.failedOn[it.Service])
		if it.State != fsm.ItemPending {
			v.update(ctx, it)
			return false
		}
	}
	it.Attempts++
	v.update(ctx, it)
	*inflight++
	v.starting[it.Service] = true
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		id, err := v.d.migrateOne(ctx, v.r, it)
		select {
		case v.steps <- step{service: it.Service, migration: id, err: err}:
		case <-ctx.Done():
		}
	}()
	return true
}

// namespaceBusy tells whether a move of this drain already runs in the
// namespace of service: a move holds its namespace's lock, so a second
// one there would be refused, and waits its turn instead.
func (v *driver) namespaceBusy(service string) bool {
	ns, _, _ := strings.Cut(service, "/")
	for other, on := range v.starting {
		if on && strings.HasPrefix(other, ns+"/") {
			return true
		}
	}
	return false
}

// reconcileItems gives each open item of a drain its state from the
// facts: a pure function of them and of the services whose migration
// goroutine runs here.
func reconcileItems(s *fsm.State, f fsm.Drain, starting map[string]bool) []fsm.DrainItem {
	items := slices.Clone(f.Items)
	for i, it := range items {
		if it.State != fsm.ItemPending && it.State != fsm.ItemMigrating {
			continue
		}
		ns, svc, _ := strings.Cut(it.Service, "/")
		sv, ok := s.Service(ns, svc)
		switch {
		case !ok:
			it.State, it.Reason = fsm.ItemSkipped, "the service was removed"
		case sv.MachineID != f.MachineID:
			it.State, it.Target, it.Reason = fsm.ItemMoved, sv.MachineID, ""
		default:
			if m, busy := s.ActiveMigration(ns, svc); busy {
				it.State, it.Migration, it.Target, it.Reason = fsm.ItemMigrating, m.ID, m.TargetID, ""
				break
			}
			if it.State != fsm.ItemMigrating || starting[it.Service] {
				break
			}
			// Its migration ended and the service is still here: aborted.
			// It is tried again on the same target: an abort says more
			// about the moment (a machine restarting) than the target.
			m, _ := s.Migration(it.Migration)
			it.Reason = fmt.Sprintf("migration %s to %s aborted: %s", m.ID, s.NameOf(m.TargetID), m.Error)
			it.State = fsm.ItemPending
			if it.Attempts >= attempts {
				it.State = fsm.ItemFailed
			}
		}
		items[i] = it
	}
	return items
}

// noteFailure records a migration of the drain that did not start or
// aborted: the service is tried again on another target, or, after
// attempts, reported failed.
func (d *Drainer) noteFailure(machineID string, st step, failedOn map[string]map[string]bool, update func(fsm.DrainItem)) {
	f, _ := d.fact(machineID)
	for _, it := range f.Items {
		if it.Service != st.service || (it.State != fsm.ItemPending && it.State != fsm.ItemMigrating) {
			continue
		}
		update(failed(it, st, failedOn, d.nameOf))
	}
}

// failed is an item after its migration did not start or aborted: a pure
// function, which also marks the target as failed for the service when
// the migration was refused before it started (pre-flight).
func failed(it fsm.DrainItem, st step, failedOn map[string]map[string]bool, nameOf func(string) string) fsm.DrainItem {
	it.State, it.Reason = fsm.ItemPending, st.err.Error()
	if st.migration == "" {
		if failedOn[it.Service] == nil {
			failedOn[it.Service] = map[string]bool{}
		}
		failedOn[it.Service][it.Target] = true
		it.Reason = fmt.Sprintf("migration to %s did not start: %v", nameOf(it.Target), st.err)
	} else {
		it.Migration = st.migration
	}
	if it.Attempts >= attempts {
		it.State = fsm.ItemFailed
	}
	return it
}

// replan finds a new target for a service, away from those that failed
// it.
func (d *Drainer) replan(ctx context.Context, machineID string, it fsm.DrainItem, failed map[string]bool) fsm.DrainItem {
	var m fsm.Machine
	d.facts.Read(func(s *fsm.State) { m, _ = s.Machine(machineID) })
	p := d.plan(ctx, m, map[string]bool{it.Service: true}, map[string]map[string]bool{it.Service: failed})
	if len(p) != 1 {
		it.State, it.Reason = fsm.ItemSkipped, "the service is no longer on "+m.Name
		return it
	}
	it.Target, it.State = p[0].Target, p[0].State
	if p[0].Reason != "" {
		it.Reason = p[0].Reason
	}
	return it
}

// migrateOne runs one service's migration, passing its events on. It
// gives the migration's id when one started, and the error that kept it
// from starting or aborted it.
func (d *Drainer) migrateOne(ctx context.Context, r *run, it fsm.DrainItem) (string, error) {
	target := d.nameOf(it.Target)
	// A drain must empty its machine: its moves converge as well as they
	// can and are never refused for their downtime.
	info, err := d.migs.Migrate(ctx, ctlapi.MigrateRequest{Service: it.Service, To: target, MaxDowntime: ctlapi.NoDowntimeBudget}, func(ev ctlapi.MigrationEvent) {
		r.emit(ctlapi.DrainEvent{Service: it.Service, Target: target, Migration: &ev})
	})
	if ctx.Err() != nil {
		return info.ID, nil // the daemon stops; the facts tell the next run
	}
	return info.ID, err
}

// end records how the drain ended.
func (d *Drainer) end(ctx context.Context, r *run, f fsm.Drain, deadlineHit bool) {
	f, _ = d.fact(f.MachineID)
	state, note := fsm.DrainDrained, ""
	if left := f.Left(); left > 0 {
		state, note = fsm.DrainIncomplete, fmt.Sprintf("%d service(s) could not move", left)
		if deadlineHit {
			note = "the deadline passed"
		}
	}
	if _, err := d.facts.Apply(ctx, fsm.EndDrain{MachineID: f.MachineID, State: state, Note: note, At: time.Now()}); err != nil {
		d.log.Warn("recording the end of a drain", "machine", d.nameOf(f.MachineID), "err", err)
		return
	}
	d.log.Info("drain ended", "machine", d.nameOf(f.MachineID), "state", state, "left", f.Left(), "note", note)
	if d.cfg.Observer != nil {
		d.cfg.Observer.DrainEnded(string(state))
	}
	r.emit(ctlapi.DrainEvent{State: string(state), Message: note})
}

// resumeLoop resumes drains every interval, once this machine's orphaned
// migrations have been dealt with.
func (d *Drainer) resumeLoop(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-d.migs.Recovered():
	}
	tick := time.NewTicker(d.cfg.Interval)
	defer tick.Stop()
	goneSince := map[string]time.Time{} // drain executors gossip sees gone, since
	for {
		d.resume(ctx, goneSince, time.Now())
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// resume runs again the drains this machine ran before it restarted,
// and, on the leader, ends as incomplete those whose executor has been
// gone for ExecutorGrace: the drain is reported, never forgotten, and an
// operator can start it again from a live machine.
func (d *Drainer) resume(ctx context.Context, goneSince map[string]time.Time, now time.Time) {
	leader := d.gos.IsLeader()
	var running []fsm.Drain
	d.facts.Read(func(s *fsm.State) {
		for _, f := range s.Drains() {
			if f.State == fsm.DrainRunning {
				running = append(running, f)
			}
		}
	})
	for _, f := range running {
		if f.Executor == d.cfg.Self {
			d.mu.Lock()
			here := d.runs[f.MachineID] != nil
			d.mu.Unlock()
			if !here {
				d.log.Info("resuming the drain this machine ran before it restarted", "machine", d.nameOf(f.MachineID))
				d.startRun(f.MachineID)
			}
			continue
		}
		if !leader {
			continue
		}
		if g, ok := d.gos.Member(f.Executor); ok && (g.Liveness == cluster.LivenessAlive || g.Liveness == cluster.LivenessSuspect) {
			delete(goneSince, f.Executor)
			continue
		}
		if goneSince[f.Executor].IsZero() {
			goneSince[f.Executor] = now
		}
		if now.Sub(goneSince[f.Executor]) < d.cfg.ExecutorGrace {
			continue
		}
		note := fmt.Sprintf("its executor %s has been gone for %s; run the drain again", d.nameOf(f.Executor), d.cfg.ExecutorGrace)
		if _, err := d.facts.Apply(ctx, fsm.EndDrain{MachineID: f.MachineID, State: fsm.DrainIncomplete, Note: note, At: time.Now()}); err != nil {
			d.log.Warn("ending a drain whose executor is gone", "machine", d.nameOf(f.MachineID), "err", err)
			continue
		}
		d.log.Warn("drain ended: its executor is gone", "machine", d.nameOf(f.MachineID), "executor", d.nameOf(f.Executor))
	}
}
