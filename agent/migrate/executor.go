package migrate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/internal/nslock"
)

// execution is a migration this daemon runs. It is owned by the
// migrator, not by the request that started it: a CLI that goes away
// does not stop it; `migrate abort` does.
type execution struct {
	id     string
	budget time.Duration // the downtime budget; zero: none
	cancel context.CancelCauseFunc
	events chan ctlapi.MigrationEvent // closed when the migration ended
	done   chan struct{}              // closed after info and err are set
	info   ctlapi.MigrationInfo
	err    error
}

func (ex *execution) emit(ev ctlapi.MigrationEvent) {
	if ex == nil {
		return
	}
	ev.ID, ev.Time = ex.id, time.Now()
	select {
	case ex.events <- ev:
	default: // nobody reads fast enough: progress is not worth blocking a migration
	}
}

// Migrate moves a service and its volumes to another machine and returns
// when the move is done or undone, passing its events to emit.
func (m *Migrator) Migrate(ctx context.Context, req ctlapi.MigrateRequest, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	return m.migrate(ctx, req, "", emit)
}

func (m *Migrator) migrate(ctx context.Context, req ctlapi.MigrateRequest, rollbackOf string, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	plan, sv, target, err := m.plan(ctx, req)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	if !plan.OK {
		var failed []string
		for _, c := range plan.Checks {
			if !c.OK {
				failed = append(failed, c.Name+": "+c.Detail)
			}
		}
		return ctlapi.MigrationInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodePreflightFailed,
			Err: fmt.Errorf("pre-flight failed, nothing moved: %s", strings.Join(failed, "; "))}
	}
	seed := make([]fsm.MigrationVolume, 0, len(plan.Volumes))
	for _, v := range plan.Volumes {
		if rollbackOf != "" && v.IncrementalBase == "" {
			return ctlapi.MigrationInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeNoBase,
				Err: fmt.Errorf("rollback of %s: the copy of volume %s on %s shares no snapshot with the live one: use migrate apply (a full copy)", rollbackOf, v.Name, target.Name)}
		}
		seed = append(seed, fsm.MigrationVolume{Name: v.Name, LastSnapshot: v.IncrementalBase, GUID: v.BaseGUID, TotalBytes: v.ReferencedBytes})
	}
	ex, err := m.startExecution(ctx, sv, target, seed, rollbackOf, budgetOf(req.MaxDowntime))
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	for {
		select {
		case ev, ok := <-ex.events:
			if ok {
				emit(ev)
				continue
			}
			<-ex.done
			return ex.info, ex.err
		case <-ctx.Done():
			info, _ := m.Show(ctx, ex.id)
			return info, fmt.Errorf("stopped following migration %s; it goes on (see `droverctl migrate show %s`): %w", ex.id, ex.id, ctx.Err())
		}
	}
}

func randomSuffix() string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// startExecution takes the namespace lock, records the migration and
// runs it in a goroutine the migrator owns.
func (m *Migrator) startExecution(ctx context.Context, sv fsm.Service, target fsm.Machine, seed []fsm.MigrationVolume, rollbackOf string, budget time.Duration) (*execution, error) {
	ns, name := sv.Namespace, sv.Spec.Name
	id := "m" + randomSuffix() + randomSuffix()
	holder := m.cfg.Name + "/migrate/" + id
	ectx, cancel := context.WithCancelCause(m.ctx)
	ex := &execution{id: id, budget: budget, cancel: cancel, events: make(chan ctlapi.MigrationEvent, 256), done: make(chan struct{})}
	// Registered before the migration exists in the facts, so recovery
	// never takes it for one whose executor died.
	m.mu.Lock()
	m.execs[id] = ex
	m.mu.Unlock()
	forget := func() {
		m.mu.Lock()
		delete(m.execs, id)
		m.mu.Unlock()
		cancel(nil)
	}
	lock, err := nslock.Acquire(ectx, m.d.Facts, ns, holder, m.cfg.LockLease, m.log)
	if err != nil {
		forget()
		return nil, err
	}
	if _, err := m.d.Facts.Apply(ctx, fsm.StartMigration{ID: id, Namespace: ns, Service: name, TargetID: target.ID, Holder: holder,
		Volumes: seed, RollbackOf: rollbackOf, At: time.Now()}); err != nil {
		lock.Release()
		forget()
		return nil, fmt.Errorf("starting migration: %w", err)
	}
	m.log.Info("migration started", "id", id, "service", ns+"/"+name, "target", target.Name)
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer forget()
		err := m.run(ectx, ex, holder)
		if err != nil {
			if cause := context.Cause(ectx); cause != nil && errors.Is(err, context.Canceled) {
				err = cause
			}
			m.log.Warn("migration failed before the commit: aborting", "id", id, "err", err)
			ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseAborting), Message: err.Error()})
			m.abort(context.WithoutCancel(ectx), id, err)
			ex.err = &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeMigrationAborted,
				Err: fmt.Errorf("migration %s of %s/%s aborted, the service runs on its source again: %w", id, ns, name, err)}
		}
		lock.Release()
		ex.info, _ = m.Show(context.WithoutCancel(ectx), id)
		m.observe(id)
		close(ex.events)
		close(ex.done)
	}()
	return ex, nil
}

// observe tells the observer how an execution ended.
func (m *Migrator) observe(id string) {
	f, ok := m.fact(id)
	if m.cfg.Observer == nil || !ok {
		return
	}
	outcome, downtime := "aborted", time.Duration(0)
	if f.Phase.Committed() {
		outcome = "done"
		if f.Cutover != nil {
			downtime = f.Cutover.Total
		}
	}
	var sent uint64
	for _, v := range f.Volumes {
		sent += v.BytesSent
	}
	m.cfg.Observer.MigrationEnded(outcome, time.Since(f.StartedAt), downtime, sent)
}

// applyRetry applies a migration command, riding out a leader change:
// it retries while the outcome is unknown or no leader answers (the
// commands are idempotent or checked by the caller), for up to a minute.
func (m *Migrator) applyRetry(ctx context.Context, cmd fsm.Command) error {
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := m.d.Facts.Apply(ctx, cmd)
		var rule *fsm.RuleError
		if err == nil || errors.As(err, &rule) || ctx.Err() != nil || time.Now().After(deadline) {
			return err
		}
		m.log.Warn("recording a migration step; retrying", "command", cmd.Type(), "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// step is one named step of a migration before its commit, read in
// order: the phase it records first (if any), what it does, and the
// executor's crash point after it (if any). A step that fails is named in
// the error.
type step struct {
	name       string
	phase      fsm.MigrationPhase
	msg        string // the phase's message
	recordVols bool   // the phase is recorded with the volumes' progress
	do         func(ctx context.Context) error
	crash      string
}

// run drives the phases up to the commit and the cleanup after. An error
// means the commit did not happen.
func (m *Migrator) run(ctx context.Context, ex *execution, holder string) error {
	id := ex.id
	f, _ := m.fact(id)
	vols := f.Volumes
	var sv fsm.Service
	m.d.Facts.Read(func(s *fsm.State) { sv, _ = s.Service(f.Namespace, f.Service) })
	phase := func(p fsm.MigrationPhase, msg string, vols []fsm.MigrationVolume) error {
		ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(p), Message: msg})
		return m.applyRetry(ctx, fsm.AdvanceMigration{ID: id, Phase: p, Volumes: vols, At: time.Now()})
	}
	var cut cutover
	steps := []step{
		{name: "image on the target", do: func(ctx context.Context) error {
			return m.imageOnTarget(ctx, ex, f, sv.Spec.RunImage())
		}},
		{name: "warm copy", phase: fsm.PhaseWarmCopy, msg: "copying while the service runs", recordVols: true, do: func(ctx context.Context) error {
			return m.warmCopy(ctx, ex, f, vols, phase, func(ctx context.Context) error {
				p, err := call(ctx, m, f.TargetID, 5*time.Minute, routePrepareTarget, migrationRef{ID: id})
				cut.Prepared = p.Adopt + p.Create
				if err == nil {
					how := "container created"
					if p.Held {
						how = "container started, held until the cutover,"
					}
					ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseWarmCopy),
						Message: fmt.Sprintf("target prepared: copies in place in %s, %s in %s", ms(p.Adopt), how, ms(p.Create))})
				}
				return err
			})
		}},
		{name: "stopping the source and sending the final increment", phase: fsm.PhaseSourceStopped,
			msg: "cutover: stopping the source, sending the final increment", do: func(ctx context.Context) error {
				return m.cutover(ctx, ex, f, sv, vols, &cut)
			}},
		{name: "starting on the target", do: func(ctx context.Context) error {
			return m.startTarget(ctx, ex, f, vols, &cut)
		}, crash: "target-started"},
	}
	for _, s := range steps {
		if s.phase != "" {
			var record []fsm.MigrationVolume
			if s.recordVols {
				record = vols
			}
			if err := phase(s.phase, s.msg, record); err != nil {
				return err
			}
		}
		if s.do != nil {
			if err := s.do(ctx); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
		}
		if s.crash != "" {
			m.cfg.Crash.Hit("executor", s.crash)
		}
	}
	// The point of no return.
	proposed := time.Now()
	commitErr := m.applyRetry(ctx, fsm.CommitMigration{ID: id, Holder: holder, ReadyAt: cut.readyAt, At: proposed})
	if now, _ := m.fact(id); !now.Phase.Committed() {
		if commitErr == nil {
			commitErr = fmt.Errorf("migration is %s after its commit", now.Phase)
		}
		return fmt.Errorf("committing: %w", commitErr)
	}
	cut.Commit, cut.Total = time.Since(proposed), time.Since(cut.began)
	ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseCommitted), Message: "committed: the target owns the volumes and serves the service IP"})
	ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseCommitted), Message: "downtime: " + cutoverInfo(cut.Cutover).String()})
	m.cfg.Crash.Hit("executor", "committed")
	m.complete(context.WithoutCancel(ctx), id, ex, &cut.Cutover)
	return nil
}

// cutover is what the executor measures of a move's downtime.
type cutover struct {
	fsm.Cutover
	began   time.Time // the stop was asked
	readyAt time.Time // the target answered ready
}

// cutover has the source stop and send the final increment of every
// volume in one call, and checks that each arrived whole.
func (m *Migrator) cutover(ctx context.Context, ex *execution, f fsm.Migration, sv fsm.Service, vols []fsm.MigrationVolume, cut *cutover) error {
	req := cutoverRequest{ID: f.ID}
	for _, v := range vols {
		req.Volumes = append(req.Volumes, streamRequest{ID: f.ID, Volume: v.Name, Snap: finalSnapshot(f.ID), Base: v.LastSnapshot})
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute+runtime.StopGrace(sv.Spec)+30*time.Minute)
	defer cancel()
	// The source writes a line every half second while it sends; silence
	// beyond the stop's grace and the stall timeout means it is gone.
	idle := time.AfterFunc(runtime.StopGrace(sv.Spec)+2*m.cfg.StallTimeout, cancel)
	defer idle.Stop()
	wctx, stop := m.watchMachine(cctx, f.SourceID)
	defer stop()
	cut.began = time.Now()
	start := time.Now()
	res, err := routeCutover.Call(wctx, m.d.Peers, f.SourceID, req, func(p cutoverProgress) {
		idle.Reset(2 * m.cfg.StallTimeout)
		if p.Stopped {
			ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseSourceStopped), Message: "source stopped: writes stopped"})
			m.cfg.Crash.Hit("executor", "source-stopped")
			start = time.Now()
			return
		}
		ev := ctlapi.MigrationEvent{Kind: "progress", Phase: string(fsm.PhaseFinalCopy), Volume: p.Volume, Bytes: p.Bytes}
		if s := time.Since(start).Seconds(); s > 0 {
			ev.Rate = float64(p.Bytes) / s
		}
		ex.emit(ev)
	})
	if err != nil {
		return goneCause(wctx, err)
	}
	if res.Stop.Killed {
		ex.emit(ctlapi.MigrationEvent{Kind: "warning", Message: fmt.Sprintf("the source container did not stop on its signal within %s and was killed", res.Stop.Grace)})
	}
	cut.Stop = res.Stopped
	for i := range vols {
		j := slices.IndexFunc(res.Volumes, func(fi finalIncrement) bool { return fi.Volume == vols[i].Name })
		if j < 0 {
			return fmt.Errorf("the source sent no final increment of volume %s", vols[i].Name)
		}
		fi := res.Volumes[j]
		if fi.Sent.SourceGUID != fi.Sent.TargetGUID {
			return fmt.Errorf("volume %s@%s: %w: %d on the source, %d on the target", vols[i].Name, finalSnapshot(f.ID), ErrGUIDMismatch, fi.Sent.SourceGUID, fi.Sent.TargetGUID)
		}
		vols[i].BytesSent += fi.Sent.Bytes
		vols[i].FinalBytes = fi.Sent.Bytes
		vols[i].LastSnapshot, vols[i].GUID = finalSnapshot(f.ID), fi.Sent.SourceGUID
		cut.FinalSnapshot = max(cut.FinalSnapshot, fi.Snapshot) // taken side by side
		cut.FinalBytes += fi.Sent.Bytes
		ex.emit(ctlapi.MigrationEvent{Kind: "progress", Phase: string(fsm.PhaseFinalCopy), Volume: vols[i].Name, Bytes: fi.Sent.Bytes})
		m.cfg.Crash.Hit("executor", "final-send")
	}
	cut.FinalSend = max(res.Sends-cut.FinalSnapshot, 0)
	return nil
}

// startTarget starts the service on the target and, at the same time,
// records that the target is starting (with the volumes' final progress):
// the commit needs that record, the downtime does not need to wait for it.
func (m *Migrator) startTarget(ctx context.Context, ex *execution, f fsm.Migration, vols []fsm.MigrationVolume, cut *cutover) error {
	ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseTargetStarting), Message: "final increment sent, GUIDs match; starting on the target"})
	recorded := make(chan error, 1)
	go func() {
		recorded <- m.applyRetry(ctx, fsm.AdvanceMigration{ID: f.ID, Phase: fsm.PhaseTargetStarting, Volumes: vols, At: time.Now()})
	}()
	st, err := call(ctx, m, f.TargetID, 10*time.Minute, routeStartTarget, migrationRef{ID: f.ID})
	if rerr := <-recorded; rerr != nil {
		return fmt.Errorf("recording the target starting: %w", rerr)
	}
	if err != nil {
		return err
	}
	cut.readyAt, cut.Adopt, cut.Start, cut.Ready, cut.Held = st.ReadyAt, st.Adopt, st.Start, st.Ready, st.Released
	return nil
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

// warmCopy sends rounds of snapshots while the service runs, until the
// predicted downtime fits the budget and the rounds stop shrinking, or
// ends the move when it cannot fit (see budget.go). The target is
// prepared after the first round, so the later rounds and the final
// increment land where the volumes are mounted, and the writes made while
// it prepares travel in the next round, not in the downtime.
func (m *Migrator) warmCopy(ctx context.Context, ex *execution, f fsm.Migration, vols []fsm.MigrationVolume, phase func(fsm.MigrationPhase, string, []fsm.MigrationVolume) error, prepare func(context.Context) error) error {
	var fixed time.Duration
	var from string
	var sv fsm.Service
	m.d.Facts.Read(func(s *fsm.State) {
		fixed, from = fixedCost(s.Migrations(), f.Namespace, f.Service)
		sv, _ = s.Service(f.Namespace, f.Service)
	})
	plan := warmPlan{fixed: fixed, budget: ex.budget}
	budget := "no budget"
	if ex.budget > 0 {
		budget = "budget " + ms(ex.budget)
	}
	var prior uint64
	flushed := len(sv.Spec.Flush) == 0
	for round := 1; ; round++ {
		began := time.Now()
		var sent uint64
		for i := range vols {
			k, err := m.sendVolume(ctx, ex, f, &vols[i], snapshotsOf(f.ID)+strconv.Itoa(round), round)
			if err != nil {
				return fmt.Errorf("round %d: %w", round, err)
			}
			sent += k
		}
		took := time.Since(began)
		m.cfg.Crash.Hit("executor", "warm-copy")
		step, predicted := plan.next(warmRound{n: round, sent: sent, took: took, prior: prior})
		msg := fmt.Sprintf("round %d sent %s in %s; predicted downtime %s (%s; fixed cost %s from %s)", round, mibs(sent), ms(took), ms(predicted), budget, ms(fixed), from)
		if err := phase(fsm.PhaseWarmCopy, msg, vols); err != nil {
			return err
		}
		if round == 1 {
			if err := prepare(ctx); err != nil {
				return fmt.Errorf("preparing the target: %w", err)
			}
		}
		switch step {
		case warmDone:
			if flushed {
				return nil
			}
			// The service writes out what it holds in memory now, and one
			// more round carries it while the service runs.
			flushed = true
			m.flush(ctx, ex, f)
		case warmGiveUp:
			return fmt.Errorf("%w: after %d rounds the last sent %s at up to %s/s, so the downtime would be about %s, over the budget of %s: raise --max-downtime, or move it while it writes less",
				ErrOverBudget, round, mibs(sent), mibs(uint64(plan.rate)), ms(predicted), ms(ex.budget))
		}
		prior = sent
	}
}

// flush has the source run the service's flush command. A flush that
// fails is reported and the move goes on: it only makes the downtime
// shorter.
func (m *Migrator) flush(ctx context.Context, ex *execution, f fsm.Migration) {
	r, err := call(ctx, m, f.SourceID, 10*time.Minute, routeFlush, migrationRef{ID: f.ID})
	switch {
	case err != nil:
		ex.emit(ctlapi.MigrationEvent{Kind: "warning", Message: fmt.Sprintf("flush before the last round: %v; going on", err)})
	case r.ExitCode != 0:
		ex.emit(ctlapi.MigrationEvent{Kind: "warning", Message: fmt.Sprintf("flush before the last round exited %d after %s; going on", r.ExitCode, ms(r.Took))})
	default:
		ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseWarmCopy), Message: fmt.Sprintf("service flushed in %s: one more round carries it", ms(r.Took))})
	}
}

// sendVolume has the source stream one snapshot of a volume to the target
// (incremental from the newest snapshot both hold) and follows its
// progress. It returns the bytes sent.
func (m *Migrator) sendVolume(ctx context.Context, ex *execution, f fsm.Migration, v *fsm.MigrationVolume, snap string, round int) (uint64, error) {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The source writes a line every half second; silence means the
	// source or the path to it is gone.
	idle := time.AfterFunc(2*m.cfg.StallTimeout, cancel)
	defer idle.Stop()
	wctx, stop := m.watchMachine(cctx, f.SourceID)
	defer stop()
	var total uint64
	if v.LastSnapshot == "" {
		total = v.TotalBytes
	}
	start := time.Now()
	progress := func(p sendProgress) {
		idle.Reset(2 * m.cfg.StallTimeout)
		ev := ctlapi.MigrationEvent{Kind: "progress", Phase: string(fsm.PhaseWarmCopy), Round: round, Volume: v.Name, Bytes: p.Bytes, Total: total}
		if round == 0 {
			ev.Phase = string(fsm.PhaseFinalCopy)
		}
		if s := time.Since(start).Seconds(); s > 0 {
			ev.Rate = float64(p.Bytes) / s
		}
		ex.emit(ev)
	}
	res, err := routeSend.Call(wctx, m.d.Peers, f.SourceID, sendRequest{ID: f.ID, Volume: v.Name, Snap: snap, Base: v.LastSnapshot}, progress)
	if err != nil {
		return 0, fmt.Errorf("sending %s@%s: %w", v.Name, snap, goneCause(wctx, err))
	}
	progress(sendProgress{Bytes: res.Bytes})
	if res.SourceGUID != res.TargetGUID {
		return 0, fmt.Errorf("volume %s@%s: %w: %d on the source, %d on the target", v.Name, snap, ErrGUIDMismatch, res.SourceGUID, res.TargetGUID)
	}
	v.BytesSent += res.Bytes
	v.LastSnapshot, v.GUID = snap, res.SourceGUID
	return res.Bytes, nil
}

// complete finishes a committed migration: the source removes its
// container and keeps its copy, both prune to the final snapshot, and the
// migration is recorded done. Only forward: a machine that does not answer
// is left to its reconciler, which does the same when it is back.
func (m *Migrator) complete(ctx context.Context, id string, ex *execution, cut *fsm.Cutover) {
	f, ok := m.fact(id)
	if !ok || f.Phase != fsm.PhaseCommitted {
		return
	}
	cleanup := func(machine string, rt peer.Route[migrationRef, done]) {
		if _, err := call(ctx, m, machine, 2*time.Minute, rt, migrationRef{ID: id}); err != nil {
			m.log.Warn("cleanup after the commit; the machine's reconciler finishes it", "id", id, "machine", m.nameOf(machine), "err", err)
		}
	}
	cleanup(f.SourceID, routeCleanupSource)
	m.cfg.Crash.Hit("executor", "cleanup")
	cleanup(f.TargetID, routeCleanupTarget)
	for {
		rec := fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseDone, At: time.Now()}
		if ok, _ := factview.FactsAt(m.d.Facts, m.d.Members, cluster.FactsLevelCutover); ok {
			// Only when every machine decodes it: an older one would halt.
			rec.Cutover = cut
		}
		err := m.applyRetry(ctx, rec)
		if now, _ := m.fact(id); now.Phase == fsm.PhaseDone {
			break
		}
		m.log.Warn("recording a committed migration as done; retrying", "id", id, "err", err)
		select {
		case <-m.ctx.Done():
			return // the next start of this daemon finishes it
		case <-time.After(time.Second):
		}
	}
	ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseDone), Message: "source container removed, source copy kept"})
}

// abort undoes a migration before its commit: it records why, has the
// target and the source undo their parts, and records it aborted. A
// machine that does not answer undoes its part when it is back (see
// recovery): the abort does not wait for it.
func (m *Migrator) abort(ctx context.Context, id string, cause error) {
	f, ok := m.fact(id)
	if !ok || f.Phase.Committed() || f.Phase.Terminal() {
		return
	}
	if f.Phase != fsm.PhaseAborting {
		m.applyRetry(ctx, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborting, Error: cause.Error(), At: time.Now()})
	}
	for _, machine := range []string{f.TargetID, f.SourceID} {
		if g, ok := m.d.Members.Member(machine); !ok || g.Liveness != cluster.LivenessAlive {
			m.log.Warn("not undoing a migration on a machine gossip does not see alive; it undoes its part when back",
				"id", id, "machine", m.nameOf(machine))
			continue
		}
		if _, err := call(ctx, m, machine, 2*time.Minute, routeAbort, migrationRef{ID: id}); err != nil {
			m.log.Error("undoing a migration; that machine undoes its part when it is back", "id", id, "machine", m.nameOf(machine), "err", err)
		}
	}
	if err := m.applyRetry(ctx, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborted, At: time.Now()}); err != nil {
		m.log.Error("recording a migration aborted", "id", id, "err", err)
	}
}

// call makes one of a migration's calls to machine within timeout,
// failing as soon as gossip reports the machine failed or left.
func call[Resp any](ctx context.Context, m *Migrator, machine string, timeout time.Duration, rt peer.Route[migrationRef, Resp], req migrationRef) (Resp, error) {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	wctx, stop := m.watchMachine(cctx, machine)
	defer stop()
	resp, err := rt.Call(wctx, m.d.Peers, machine, req)
	return resp, goneCause(wctx, err)
}

// watchMachine gives a context that ends as soon as gossip reports the
// machine failed or left: a killed daemon takes its WireGuard device with
// it, so its overlay address answers nothing, not even a reset, and a
// plain call would wait for TCP's own timeouts. stop ends the watch.
func (m *Migrator) watchMachine(ctx context.Context, machine string) (context.Context, func()) {
	cctx, cancel := context.WithCancelCause(ctx)
	stopped := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopped:
				return
			case <-cctx.Done():
				return
			case <-tick.C:
			}
			if g, ok := m.d.Members.Member(machine); ok && (g.Liveness == cluster.LivenessFailed || g.Liveness == cluster.LivenessLeft) {
				cancel(fmt.Errorf("%w: %s is %s", ErrMachineGone, m.nameOf(machine), g.Liveness))
				return
			}
		}
	}()
	return cctx, func() {
		close(stopped)
		<-finished
		cancel(nil)
	}
}

// goneCause names a call's failure by the machine being gone, when that
// is what ended it.
func goneCause(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if cause := context.Cause(ctx); cause != nil && errors.Is(cause, ErrMachineGone) {
		return fmt.Errorf("%w (%v)", cause, err)
	}
	return err
}

func mibs(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// imageOnTarget has the target get the service's image before the source
// stops: it pulls it, or, when it cannot, the source streams it over the
// mesh.
func (m *Migrator) imageOnTarget(ctx context.Context, ex *execution, f fsm.Migration, image string) error {
	pctx, cancelPull := context.WithTimeout(ctx, 30*time.Minute)
	r, err := routePrepareImage.Call(pctx, m.d.Peers, f.TargetID, migrationRef{ID: f.ID}, func(pp runtime.PullProgress) {
		ex.emit(ctlapi.MigrationEvent{Kind: "progress", Phase: "image", Volume: "pull " + pp.Layer + " " + pp.Status,
			Bytes: uint64(max(pp.Current, 0)), Total: uint64(max(pp.Total, 0))})
	})
	cancelPull()
	switch {
	case err != nil:
		return err
	case r.Pulled:
		ex.emit(ctlapi.MigrationEvent{Kind: "image", Message: fmt.Sprintf("image %s pulled on the target in %s", image, r.Took.Round(time.Millisecond))})
		return nil
	case r.Missing == "":
		return nil // the target has it
	}
	ex.emit(ctlapi.MigrationEvent{Kind: "image", Message: fmt.Sprintf("the target cannot pull image %s (%s): streaming it from the source", image, r.Missing)})
	began := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	sent, err := routeSendImage.Call(cctx, m.d.Peers, f.SourceID, migrationRef{ID: f.ID}, func(p imageProgress) {
		ex.emit(ctlapi.MigrationEvent{Kind: "progress", Phase: "image", Volume: "image", Bytes: p.Bytes})
	})
	if err != nil {
		return fmt.Errorf("the target cannot pull image %s (%s), and the source could not stream it: %w", image, r.Missing, err)
	}
	ex.emit(ctlapi.MigrationEvent{Kind: "image", Message: fmt.Sprintf("image %s streamed from the source to the target: %d MiB in %s", image, sent.Bytes>>20, time.Since(began).Round(time.Millisecond))})
	return nil
}
