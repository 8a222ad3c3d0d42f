package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// drainAttempts bounds the migrations a drain starts for one service: a
// migration aborted because a machine restarted is worth another try, one
// that keeps failing is reported.
const drainAttempts = 3

// errDrainDeadline is the cause of the migrations a drain aborts when its
// deadline passes.
var errDrainDeadline = errors.New("the drain's deadline passed before the commit")

// drainRun is a drain this daemon runs. Followers subscribe to its events;
// the drain's state itself is in the facts.
type drainRun struct {
	machineID string
	mu        sync.Mutex
	subs      map[chan ctlapi.DrainEvent]struct{}
	done      chan struct{} // closed when the run stopped
}

func (d *drainRun) subscribe() (<-chan ctlapi.DrainEvent, func()) {
	ch := make(chan ctlapi.DrainEvent, 256)
	d.mu.Lock()
	d.subs[ch] = struct{}{}
	d.mu.Unlock()
	return ch, func() {
		d.mu.Lock()
		delete(d.subs, ch)
		d.mu.Unlock()
	}
}

func (d *drainRun) emit(ev ctlapi.DrainEvent) {
	ev.Time = time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	for ch := range d.subs {
		select {
		case ch <- ev:
		default: // a slow follower loses progress lines, never the drain
		}
	}
}

// Drain starts the drain of a machine, or follows the one that runs.
func (a *Agent) Drain(ctx context.Context, req ctlapi.DrainRequest, emit func(ctlapi.DrainEvent)) (ctlapi.DrainInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	m, err := a.machineByName(n, req.Machine)
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	if req.Parallel == 0 {
		req.Parallel = 1
	}
	if req.Parallel < 0 || req.Deadline < 0 {
		return ctlapi.DrainInfo{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: "bad_request",
			Err: fmt.Errorf("drain of %s: --parallel %d and --deadline %s must not be negative", m.Name, req.Parallel, time.Duration(req.Deadline))}
	}
	if req.DryRun {
		items := a.planDrain(ctx, n, m, nil, nil)
		info := a.drainInfo(fsm.Drain{MachineID: m.ID, Parallel: req.Parallel, Items: items})
		info.State = "planned"
		return info, nil
	}
	d, known := a.drainFact(n, m.ID)
	if !known || d.State != fsm.DrainRunning {
		if m.State == fsm.MachineGone {
			return ctlapi.DrainInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: "machine_gone", Err: fmt.Errorf("machine %s is gone: remove it with `droverctl machine rm %s`", m.Name, m.Name)}
		}
		d = fsm.Drain{MachineID: m.ID, Executor: a.machineID, Parallel: req.Parallel, Items: a.planDrain(ctx, n, m, nil, nil)}
		if req.Deadline > 0 {
			d.Deadline = time.Now().Add(time.Duration(req.Deadline))
		}
		raw, err := n.Apply(ctx, fsm.StartDrain{Drain: d, At: time.Now()})
		if err != nil {
			return ctlapi.DrainInfo{}, fmt.Errorf("starting the drain of %s: %w", m.Name, err)
		}
		if err := json.Unmarshal(raw, &d); err != nil {
			return ctlapi.DrainInfo{}, fmt.Errorf("starting the drain of %s: reading the result: %w", m.Name, err)
		}
		a.logger.Info("drain started", "machine", m.Name, "services", len(d.Items), "parallel", d.Parallel, "deadline", d.Deadline)
		a.startDrainRun(n, m.ID)
	}
	if !req.Wait {
		return a.drainInfo(d), nil
	}
	return a.followDrain(ctx, n, m.ID, emit)
}

// DrainStatus gives a machine's latest drain.
func (a *Agent) DrainStatus(_ context.Context, machine string) (ctlapi.DrainInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	m, err := a.machineByName(n, machine)
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	d, ok := a.drainFact(n, m.ID)
	if !ok {
		return ctlapi.DrainInfo{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: "no_drain", Err: fmt.Errorf("machine %s was never drained", m.Name)}
	}
	return a.drainInfo(d), nil
}

func (a *Agent) drainFact(n *cluster.Node, machineID string) (fsm.Drain, bool) {
	var d fsm.Drain
	var ok bool
	n.Read(func(s *fsm.State) { d, ok = s.Drain(machineID) })
	return d, ok
}

func (a *Agent) drainInfo(d fsm.Drain) ctlapi.DrainInfo {
	out := ctlapi.DrainInfo{Machine: a.nameOf(d.MachineID), Executor: a.nameOf(d.Executor), State: string(d.State),
		Parallel: d.Parallel, Deadline: d.Deadline, StartedAt: d.StartedAt, EndedAt: d.EndedAt, Note: d.Note, Items: []ctlapi.DrainItem{}}
	for _, it := range d.Items {
		out.Items = append(out.Items, ctlapi.DrainItem{Service: it.Service, Target: a.nameOf(it.Target), State: string(it.State), Migration: it.Migration, Reason: it.Reason})
		if it.State == fsm.ItemMoved {
			out.Moved++
		}
	}
	out.Left = len(d.Items) - out.Moved
	return out
}

// followDrain passes a drain's events to emit until it ends: the rich
// ones (migration progress) when this daemon runs it, else the changes of
// its facts.
func (a *Agent) followDrain(ctx context.Context, n *cluster.Node, machineID string, emit func(ctlapi.DrainEvent)) (ctlapi.DrainInfo, error) {
	a.mu.Lock()
	run := a.drains[machineID]
	a.mu.Unlock()
	var events <-chan ctlapi.DrainEvent
	var done <-chan struct{}
	if run != nil {
		ch, unsubscribe := run.subscribe()
		defer unsubscribe()
		events, done = ch, run.done
	}
	last := map[string]fsm.DrainItemState{}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		d, _ := a.drainFact(n, machineID)
		if run == nil {
			for _, it := range d.Items {
				if last[it.Service] != it.State {
					last[it.Service] = it.State
					emit(ctlapi.DrainEvent{Time: time.Now(), Service: it.Service, Target: a.nameOf(it.Target), State: string(it.State), Message: it.Reason})
				}
			}
		}
		if d.State != fsm.DrainRunning && (run == nil || isClosed(done)) {
			info := a.drainInfo(d)
			if d.State != fsm.DrainDrained {
				return info, &ctlapi.APIError{Status: http.StatusConflict, Code: "drain_" + string(d.State),
					Err: fmt.Errorf("drain of %s ended %s: %s", info.Machine, d.State, drainLeftover(info))}
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
			d, _ := a.drainFact(n, machineID)
			return a.drainInfo(d), fmt.Errorf("stopped following the drain of %s; it goes on (see `droverctl machine ls`): %w", a.nameOf(machineID), ctx.Err())
		}
	}
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

// drainLeftover says what a drain left on its machine, and why.
func drainLeftover(info ctlapi.DrainInfo) string {
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

// drainCandidate is a machine that may take services of a drain, with
// what is left of it as the plan fills it.
type drainCandidate struct {
	m        fsm.Machine
	free     uint64 // pool space
	mem      uint64
	volumes  bool // it holds volumes
	images   map[string]bool
	problems string // why it cannot take anything, when it cannot
}

// planDrain gives a target to every service on a machine, by free pool
// space and memory, each placement lowering what is left of its target:
// the services spread over the machines with the most room. only limits
// the plan to those services; exclude keeps machines out per service.
// Services that cannot move get the reason and stay.
func (a *Agent) planDrain(ctx context.Context, n *cluster.Node, machine fsm.Machine, only map[string]bool, exclude map[string]map[string]bool) []fsm.DrainItem {
	var services []fsm.Service
	var idle []fsm.Volume
	var machines []fsm.Machine
	n.Read(func(s *fsm.State) {
		used := map[string]bool{}
		for _, sv := range s.Services() {
			for _, v := range sv.Spec.Volumes {
				used[sv.Namespace+"/"+v.Name] = true
			}
			if sv.MachineID == machine.ID && (only == nil || only[sv.Key()]) {
				services = append(services, sv)
			}
		}
		for _, v := range s.Volumes() {
			if v.OwnerID == machine.ID && !used[v.Key()] && only == nil {
				idle = append(idle, v)
			}
		}
		machines = s.Machines()
	})
	live := map[string]cluster.Liveness{}
	for _, m := range n.Members() {
		live[m.MachineID] = m.Liveness
	}
	images := url.Values{}
	for _, sv := range services {
		if !slices.Contains(images["images"], sv.Spec.Image) {
			images.Add("images", sv.Spec.Image)
		}
	}
	var cands []*drainCandidate
	for _, m := range machines {
		if m.ID == machine.ID {
			continue
		}
		c := &drainCandidate{m: m}
		switch {
		case m.State != fsm.MachineActive:
			c.problems = fmt.Sprintf("%s is %s", m.Name, m.State)
		case live[m.ID] != cluster.LivenessAlive:
			c.problems = fmt.Sprintf("%s is %s", m.Name, cmp.Or(string(live[m.ID]), "unknown"))
		default:
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			lf, err := queryLocalFacts(cctx, n, m.ID, images)
			cancel()
			if err != nil {
				c.problems = fmt.Sprintf("%s does not answer: %v", m.Name, err)
			}
			c.free, c.mem, c.volumes, c.images = lf.VolumeFreeBytes, lf.MemoryBytes, lf.HoldsVolumes, lf.Images
		}
		cands = append(cands, c)
	}
	type sized struct {
		sv   fsm.Service
		need uint64
		err  error
	}
	var sizes []sized
	for _, sv := range services {
		z := sized{sv: sv}
		if len(sv.Spec.Volumes) > 0 {
			lf, err := a.askLocalFacts(ctx, n, machine.ID, sv)
			if err != nil {
				z.err = fmt.Errorf("%s does not say how large its volumes are: %w", machine.Name, err)
			}
			for _, v := range sv.Spec.Volumes {
				z.need += lf.Volumes[v.Name].ReferencedBytes
			}
			z.need += z.need / 10
		}
		sizes = append(sizes, z)
	}
	// Largest first: they are the hardest to place.
	slices.SortStableFunc(sizes, func(x, y sized) int { return cmp.Compare(y.need, x.need) })

	var items []fsm.DrainItem
	for _, z := range sizes {
		it := fsm.DrainItem{Service: z.sv.Key(), State: fsm.ItemPending}
		switch {
		case len(z.sv.Spec.Binds) > 0:
			it.State, it.Reason = fsm.ItemStays, bindsDetail(z.sv.Spec.Binds, machine.Name)
		case live[machine.ID] != cluster.LivenessAlive:
			it.State, it.Reason = fsm.ItemStays, fmt.Sprintf("%s is %s: nothing can be copied from it", machine.Name, cmp.Or(string(live[machine.ID]), "unknown"))
		case z.err != nil:
			it.State, it.Reason = fsm.ItemStays, z.err.Error()
		default:
			best, why := pickDrainTarget(cands, z.sv, z.need, exclude[z.sv.Key()])
			if best == nil {
				it.State, it.Reason = fsm.ItemStays, "no machine can take it: "+why
				break
			}
			it.Target = best.m.ID
			best.free -= min(best.free, z.need)
			best.mem -= min(best.mem, z.sv.Spec.MemoryBytes)
		}
		items = append(items, it)
	}
	for _, v := range idle {
		items = append(items, fsm.DrainItem{Service: "volume " + v.Key(), State: fsm.ItemStays,
			Reason: "no service uses it, and only a service's migration moves a volume"})
	}
	slices.SortStableFunc(items, func(x, y fsm.DrainItem) int { return strings.Compare(x.Service, y.Service) })
	return items
}

// pickDrainTarget chooses the candidate with the most pool space left
// after taking the service, then the most memory; why says, when none
// fits, what each lacks.
func pickDrainTarget(cands []*drainCandidate, sv fsm.Service, need uint64, exclude map[string]bool) (*drainCandidate, string) {
	var best *drainCandidate
	var why []string
	for _, c := range cands {
		var lack string
		switch {
		case c.problems != "":
			lack = c.problems
		case exclude[c.m.ID]:
			lack = fmt.Sprintf("%s failed to take it already", c.m.Name)
		case len(sv.Spec.Volumes) > 0 && !c.volumes:
			lack = fmt.Sprintf("%s holds no volumes", c.m.Name)
		case c.free < need:
			lack = fmt.Sprintf("%s has %s of pool space, needs %s", c.m.Name, mibs(c.free), mibs(need))
		case c.mem < sv.Spec.MemoryBytes:
			lack = fmt.Sprintf("%s has %s of memory, needs %s", c.m.Name, mibs(c.mem), mibs(sv.Spec.MemoryBytes))
		case !c.images[sv.Spec.Image]:
			lack = fmt.Sprintf("%s lacks image %s", c.m.Name, sv.Spec.Image)
		}
		if lack != "" {
			why = append(why, lack)
			continue
		}
		if best == nil || c.free-need > best.free-need || (c.free == best.free && c.mem > best.mem) {
			best = c
		}
	}
	if len(why) == 0 {
		why = append(why, "there is no other machine")
	}
	return best, strings.Join(why, "; ")
}

// startDrainRun runs a drain of the facts in a goroutine the daemon owns,
// unless one runs here already.
func (a *Agent) startDrainRun(n *cluster.Node, machineID string) {
	a.mu.Lock()
	if a.drains[machineID] != nil {
		a.mu.Unlock()
		return
	}
	run := &drainRun{machineID: machineID, subs: map[chan ctlapi.DrainEvent]struct{}{}, done: make(chan struct{})}
	a.drains[machineID] = run
	a.mu.Unlock()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer func() {
			a.mu.Lock()
			delete(a.drains, machineID)
			a.mu.Unlock()
			close(run.done)
		}()
		a.runDrain(a.ctx, n, run)
	}()
}

// drainStep is what a migration goroutine of a drain reports back.
type drainStep struct {
	service   string
	migration string // empty when it did not start
	err       error  // why it did not start, or why it aborted
}

// runDrain drives a drain from its facts until it ends. Each round it
// brings every service's state in line with the facts (a service no
// longer on the machine moved; one with a running migration migrates; one
// whose migration aborted is tried again, up to drainAttempts, on another
// target when possible), starts migrations up to the parallelism, and
// after the deadline starts none and aborts those not committed yet.
// Since the state is read from the facts, a restarted daemon resumes
// where it was.
func (a *Agent) runDrain(ctx context.Context, n *cluster.Node, run *drainRun) {
	machineID := run.machineID
	name := a.nameOf(machineID)
	starting := map[string]bool{} // services whose migration goroutine runs
	failedOn := map[string]map[string]bool{}
	steps := make(chan drainStep)
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	deadlineHit := false
	update := func(it fsm.DrainItem) {
		if _, err := n.Apply(ctx, fsm.UpdateDrainItem{MachineID: machineID, Item: it, At: time.Now()}); err != nil {
			a.logger.Warn("recording a drain step", "machine", name, "service", it.Service, "err", err)
			return
		}
		if it.State == fsm.ItemPending && it.Reason == "" {
			return // bookkeeping (an attempt counted), nothing to tell
		}
		run.emit(ctlapi.DrainEvent{Service: it.Service, Target: a.nameOf(it.Target), State: string(it.State), Message: it.Reason})
	}
	for {
		d, ok := a.drainFact(n, machineID)
		if !ok || d.State != fsm.DrainRunning || d.Executor != a.machineID {
			if len(starting) == 0 {
				return
			}
		} else {
			if !d.Deadline.IsZero() && !time.Now().Before(d.Deadline) && !deadlineHit {
				deadlineHit = true
				a.logger.Warn("drain deadline passed: starting no more migrations, aborting those not committed", "machine", name)
				run.emit(ctlapi.DrainEvent{Message: "deadline passed: no new migrations; running ones abort unless committed"})
				a.abortDrainMigrations(d)
			}
			items := a.reconcileDrainItems(n, d, starting)
			inflight := len(starting)
			for _, it := range items {
				if it.State == fsm.ItemMigrating && !starting[it.Service] {
					inflight++
				}
			}
			open := 0
			for i, it := range items {
				if it != d.Items[i] {
					update(it)
				}
				switch it.State {
				case fsm.ItemPending:
					if deadlineHit {
						it.State, it.Reason = fsm.ItemSkipped, strings.TrimSuffix("the deadline passed; "+it.Reason, "; ")
						update(it)
						continue
					}
					open++
					if inflight < d.Parallel && !starting[it.Service] {
						if it.Target == "" || failedOn[it.Service][it.Target] {
							it = a.replanDrainItem(ctx, n, machineID, it, failedOn[it.Service])
							if it.State != fsm.ItemPending {
								update(it)
								open--
								continue
							}
						}
						it.Attempts++
						update(it)
						inflight++
						starting[it.Service] = true
						wg.Add(1)
						go func(it fsm.DrainItem) {
							defer wg.Done()
							id, err := a.drainMigrate(ctx, n, run, it)
							select {
							case steps <- drainStep{service: it.Service, migration: id, err: err}:
							case <-ctx.Done():
							}
						}(it)
					}
				case fsm.ItemMigrating:
					open++
				}
			}
			if open == 0 && len(starting) == 0 {
				a.endDrain(ctx, n, run, d, deadlineHit)
				return
			}
		}
		select {
		case st := <-steps:
			delete(starting, st.service)
			if st.err != nil {
				a.noteFailure(n, machineID, st, failedOn, update)
			}
		case <-tick.C:
		case <-ctx.Done():
			return
		}
	}
}

// reconcileDrainItems gives each open item its state from the facts.
func (a *Agent) reconcileDrainItems(n *cluster.Node, d fsm.Drain, starting map[string]bool) []fsm.DrainItem {
	items := slices.Clone(d.Items)
	n.Read(func(s *fsm.State) {
		for i, it := range items {
			if it.State != fsm.ItemPending && it.State != fsm.ItemMigrating {
				continue
			}
			ns, svc, _ := strings.Cut(it.Service, "/")
			sv, ok := s.Service(ns, svc)
			switch {
			case !ok:
				it.State, it.Reason = fsm.ItemSkipped, "the service was removed"
			case sv.MachineID != d.MachineID:
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
				if it.Attempts >= drainAttempts {
					it.State = fsm.ItemFailed
				}
			}
			items[i] = it
		}
	})
	return items
}

// noteFailure records a migration of the drain that did not start or
// aborted: the service is tried again on another target, or, after
// drainAttempts, reported failed.
func (a *Agent) noteFailure(n *cluster.Node, machineID string, st drainStep, failedOn map[string]map[string]bool, update func(fsm.DrainItem)) {
	d, _ := a.drainFact(n, machineID)
	for _, it := range d.Items {
		if it.Service != st.service || (it.State != fsm.ItemPending && it.State != fsm.ItemMigrating) {
			continue
		}
		it.State, it.Reason = fsm.ItemPending, st.err.Error()
		if st.migration == "" {
			// Refused before it started (pre-flight): another target.
			if failedOn[it.Service] == nil {
				failedOn[it.Service] = map[string]bool{}
			}
			failedOn[it.Service][it.Target] = true
			it.Reason = fmt.Sprintf("migration to %s did not start: %v", a.nameOf(it.Target), st.err)
		} else {
			it.Migration = st.migration
		}
		if it.Attempts >= drainAttempts {
			it.State = fsm.ItemFailed
		}
		update(it)
	}
}

// replanDrainItem finds a new target for a service, away from those that
// failed it.
func (a *Agent) replanDrainItem(ctx context.Context, n *cluster.Node, machineID string, it fsm.DrainItem, failed map[string]bool) fsm.DrainItem {
	var m fsm.Machine
	n.Read(func(s *fsm.State) { m, _ = s.Machine(machineID) })
	plan := a.planDrain(ctx, n, m, map[string]bool{it.Service: true}, map[string]map[string]bool{it.Service: failed})
	if len(plan) != 1 {
		it.State, it.Reason = fsm.ItemSkipped, "the service is no longer on "+m.Name
		return it
	}
	it.Target, it.State = plan[0].Target, plan[0].State
	if plan[0].Reason != "" {
		it.Reason = plan[0].Reason
	}
	return it
}

// drainMigrate runs one service's migration, passing its events on. It
// gives the migration's id when one started, and the error that kept it
// from starting or aborted it.
func (a *Agent) drainMigrate(ctx context.Context, n *cluster.Node, run *drainRun, it fsm.DrainItem) (string, error) {
	target := a.nameOf(it.Target)
	info, err := a.Migrate(ctx, ctlapi.MigrateRequest{Service: it.Service, To: target}, func(ev ctlapi.MigrationEvent) {
		run.emit(ctlapi.DrainEvent{Service: it.Service, Target: target, Migration: &ev})
	})
	if ctx.Err() != nil {
		return info.ID, nil // the daemon stops; the facts tell the next run
	}
	return info.ID, err
}

// abortDrainMigrations aborts the drain's migrations that run here and are
// not committed; those of other executors end by their own leases.
func (a *Agent) abortDrainMigrations(d fsm.Drain) {
	for _, it := range d.Items {
		if it.State != fsm.ItemMigrating {
			continue
		}
		if ex := a.execution(it.Migration); ex != nil {
			if m, ok := a.migrationFact(a.currentNode(), it.Migration); ok && !m.Phase.Committed() {
				ex.cancel(errDrainDeadline)
			}
		}
	}
}

// endDrain records how the drain ended.
func (a *Agent) endDrain(ctx context.Context, n *cluster.Node, run *drainRun, d fsm.Drain, deadlineHit bool) {
	d, _ = a.drainFact(n, d.MachineID)
	state, note := fsm.DrainDrained, ""
	if left := d.Left(); left > 0 {
		state, note = fsm.DrainIncomplete, fmt.Sprintf("%d service(s) could not move", left)
		if deadlineHit {
			note = "the deadline passed"
		}
	}
	if _, err := n.Apply(ctx, fsm.EndDrain{MachineID: d.MachineID, State: state, Note: note, At: time.Now()}); err != nil {
		a.logger.Warn("recording the end of a drain", "machine", a.nameOf(d.MachineID), "err", err)
		return
	}
	a.logger.Info("drain ended", "machine", a.nameOf(d.MachineID), "state", state, "left", d.Left(), "note", note)
	run.emit(ctlapi.DrainEvent{State: string(state), Message: note})
}

// resumeDrains runs again the drains this machine ran before it
// restarted, and, on the leader, ends as incomplete those whose executor
// has been gone for a lock lease: the drain is reported, never forgotten,
// and an operator can start it again from a live machine.
func (a *Agent) resumeDrains(ctx context.Context, n *cluster.Node, goneSince map[string]time.Time) {
	leader := false
	if st, err := n.Status(); err == nil && st.Role == cluster.RoleLeader {
		leader = true
	}
	var running []fsm.Drain
	n.Read(func(s *fsm.State) {
		for _, d := range s.Drains() {
			if d.State == fsm.DrainRunning {
				running = append(running, d)
			}
		}
	})
	for _, d := range running {
		if d.Executor == a.machineID {
			a.mu.Lock()
			here := a.drains[d.MachineID] != nil
			a.mu.Unlock()
			if !here {
				a.logger.Info("resuming the drain this machine ran before it restarted", "machine", a.nameOf(d.MachineID))
				a.startDrainRun(n, d.MachineID)
			}
			continue
		}
		if !leader {
			continue
		}
		if g, ok := n.Member(d.Executor); ok && (g.Liveness == cluster.LivenessAlive || g.Liveness == cluster.LivenessSuspect) {
			delete(goneSince, d.Executor)
			continue
		}
		if goneSince[d.Executor].IsZero() {
			goneSince[d.Executor] = time.Now()
		}
		if time.Since(goneSince[d.Executor]) < a.cfg.LockLease {
			continue
		}
		note := fmt.Sprintf("its executor %s has been gone for %s; run the drain again", a.nameOf(d.Executor), a.cfg.LockLease)
		if _, err := n.Apply(ctx, fsm.EndDrain{MachineID: d.MachineID, State: fsm.DrainIncomplete, Note: note, At: time.Now()}); err != nil {
			a.logger.Warn("ending a drain whose executor is gone", "machine", a.nameOf(d.MachineID), "err", err)
			continue
		}
		a.logger.Warn("drain ended: its executor is gone", "machine", a.nameOf(d.MachineID), "executor", a.nameOf(d.Executor))
	}
}
