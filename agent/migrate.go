package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
)

// warmRounds bounds the incremental rounds while the service runs; a
// round that sends less than warmEnough ends the warm copy.
const (
	warmRounds = 4
	warmEnough = 8 << 20
)

// errAbortedByOperator is the cause of an abort asked with `migrate abort`
// or Ctrl-C.
var errAbortedByOperator = errors.New("aborted by the operator")

// execution is a migration this daemon runs. It is owned by the daemon,
// not by the request that started it: a CLI that goes away does not stop
// it; `migrate abort` does.
type execution struct {
	id     string
	cancel context.CancelCauseFunc
	events chan ctlapi.MigrationEvent // closed when the migration ended
	done   chan struct{}              // closed after info and err are set
	info   ctlapi.MigrationInfo
	err    error
}

func (ex *execution) emit(ev ctlapi.MigrationEvent) {
	ev.ID, ev.Time = ex.id, time.Now()
	select {
	case ex.events <- ev:
	default: // nobody reads fast enough: progress is not worth blocking a migration
	}
}

// Migrate moves a service and its volumes to another machine and returns
// when the move is done or undone, passing its events to emit.
func (a *Agent) Migrate(ctx context.Context, req ctlapi.MigrateRequest, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	return a.migrate(ctx, req, "", emit)
}

func (a *Agent) migrate(ctx context.Context, req ctlapi.MigrateRequest, rollbackOf string, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	plan, sv, target, err := a.planMigration(ctx, n, req)
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
		return ctlapi.MigrationInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: "preflight_failed",
			Err: fmt.Errorf("pre-flight failed, nothing moved: %s", strings.Join(failed, "; "))}
	}
	seed := make([]fsm.MigrationVolume, 0, len(plan.Volumes))
	for _, v := range plan.Volumes {
		if rollbackOf != "" && v.IncrementalBase == "" {
			return ctlapi.MigrationInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: "no_base",
				Err: fmt.Errorf("rollback of %s: the copy of volume %s on %s shares no snapshot with the live one: use migrate apply (a full copy)", rollbackOf, v.Name, target.Name)}
		}
		seed = append(seed, fsm.MigrationVolume{Name: v.Name, LastSnapshot: v.IncrementalBase, GUID: v.BaseGUID, TotalBytes: v.ReferencedBytes})
	}
	ex, err := a.startExecution(ctx, n, sv, target, seed, rollbackOf)
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
			info, _ := a.migrationInfo(n, ex.id)
			return info, fmt.Errorf("stopped following migration %s; it goes on (see `droverctl migrate show %s`): %w", ex.id, ex.id, ctx.Err())
		}
	}
}

// startExecution takes the namespace lock, records the migration and
// runs it in a goroutine the daemon owns.
func (a *Agent) startExecution(ctx context.Context, n *cluster.Node, sv fsm.Service, target fsm.Machine, seed []fsm.MigrationVolume, rollbackOf string) (*execution, error) {
	ns, name := sv.Namespace, sv.Spec.Name
	id := "m" + randomSuffix() + randomSuffix()
	holder := a.cfg.Name + "/migrate/" + id
	ectx, cancel := context.WithCancelCause(a.ctx)
	ex := &execution{id: id, cancel: cancel, events: make(chan ctlapi.MigrationEvent, 256), done: make(chan struct{})}
	// Registered before the migration exists in the facts, so the janitor
	// never takes it for one whose executor died.
	a.mu.Lock()
	a.execs[id] = ex
	a.mu.Unlock()
	forget := func() {
		a.mu.Lock()
		delete(a.execs, id)
		a.mu.Unlock()
		cancel(nil)
	}
	if err := a.acquire(ctx, n, ns, holder); err != nil {
		forget()
		return nil, err
	}
	release := func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ectx), 10*time.Second)
		defer cancel()
		if _, err := n.Apply(rctx, fsm.ReleaseLock{Namespace: ns, Holder: holder, At: time.Now()}); err != nil {
			a.logger.Warn("releasing the namespace lock; its lease will run out", "namespace", ns, "err", err)
		}
	}
	if _, err := n.Apply(ctx, fsm.StartMigration{ID: id, Namespace: ns, Service: name, TargetID: target.ID, Holder: holder,
		Volumes: seed, RollbackOf: rollbackOf, At: time.Now()}); err != nil {
		release()
		forget()
		return nil, fmt.Errorf("starting migration: %w", err)
	}
	a.logger.Info("migration started", "id", id, "service", ns+"/"+name, "target", target.Name)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer forget()
		lockCtx, stopRenew := context.WithCancel(ectx)
		renewDone := make(chan struct{})
		go func() { defer close(renewDone); a.renewLock(lockCtx, n, ns, holder) }()
		err := a.runMigration(ectx, n, ex, holder)
		if err != nil {
			if cause := context.Cause(ectx); cause != nil && errors.Is(err, context.Canceled) {
				err = cause
			}
			a.logger.Warn("migration failed before the commit: aborting", "id", id, "err", err)
			ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseAborting), Message: err.Error()})
			a.abortMigration(context.WithoutCancel(ectx), n, id, err)
			ex.err = &ctlapi.APIError{Status: http.StatusConflict, Code: "migration_aborted",
				Err: fmt.Errorf("migration %s of %s/%s aborted, the service runs on its source again: %w", id, ns, name, err)}
		}
		stopRenew()
		<-renewDone
		release()
		ex.info, _ = a.migrationInfo(n, id)
		close(ex.events)
		close(ex.done)
	}()
	return ex, nil
}

// applyMigration applies a migration command, riding out a leader change:
// it retries while the outcome is unknown or no leader answers (the
// commands are idempotent or checked by the caller), for up to a minute.
func (a *Agent) applyMigration(ctx context.Context, n *cluster.Node, cmd fsm.Command) error {
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := n.Apply(ctx, cmd)
		var rule *fsm.RuleError
		if err == nil || errors.As(err, &rule) || ctx.Err() != nil || time.Now().After(deadline) {
			return err
		}
		a.logger.Warn("recording a migration step; retrying", "command", cmd.Type(), "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// runMigration drives the phases up to the commit and the cleanup after.
// An error means the commit did not happen.
func (a *Agent) runMigration(ctx context.Context, n *cluster.Node, ex *execution, holder string) error {
	id := ex.id
	m, _ := a.migrationFact(n, id)
	phase := func(p fsm.MigrationPhase, msg string, vols []fsm.MigrationVolume) error {
		ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(p), Message: msg})
		return a.applyMigration(ctx, n, fsm.AdvanceMigration{ID: id, Phase: p, Volumes: vols, At: time.Now()})
	}
	call := func(machine, path string, timeout time.Duration, out any) error {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		resp, done, err := a.callMachine(cctx, n, machine, http.MethodPost, path+"?id="+id)
		if err != nil {
			return err
		}
		defer done()
		defer resp.Body.Close()
		if out != nil {
			return json.NewDecoder(resp.Body).Decode(out)
		}
		return nil
	}

	vols := m.Volumes
	if err := phase(fsm.PhaseWarmCopy, "copying while the service runs", vols); err != nil {
		return err
	}
	for round := 1; round <= warmRounds; round++ {
		var sent uint64
		for i := range vols {
			k, err := a.sendVolume(ctx, n, ex, m, &vols[i], volume.SnapshotPrefix+id+"-"+strconv.Itoa(round), round)
			if err != nil {
				return fmt.Errorf("warm copy round %d: %w", round, err)
			}
			sent += k
		}
		a.crashPoint("executor", "warm-copy")
		if err := phase(fsm.PhaseWarmCopy, fmt.Sprintf("round %d sent %s", round, mibs(sent)), vols); err != nil {
			return err
		}
		if sent < warmEnough {
			break
		}
	}
	if err := call(m.SourceID, rpcStopSource, time.Minute, nil); err != nil {
		return fmt.Errorf("stopping the source: %w", err)
	}
	if err := phase(fsm.PhaseSourceStopped, "source stopped: writes stopped", nil); err != nil {
		return err
	}
	a.crashPoint("executor", "source-stopped")
	for i := range vols {
		k, err := a.sendVolume(ctx, n, ex, m, &vols[i], finalSnapshot(id), 0)
		if err != nil {
			return fmt.Errorf("final copy: %w", err)
		}
		vols[i].FinalBytes = k
		a.crashPoint("executor", "final-send")
	}
	if err := phase(fsm.PhaseFinalCopy, "final increment sent, GUIDs match", vols); err != nil {
		return err
	}
	if err := phase(fsm.PhaseTargetStarting, "starting on the target", nil); err != nil {
		return err
	}
	var started startResult
	if err := call(m.TargetID, rpcStartTarget, 10*time.Minute, &started); err != nil {
		return fmt.Errorf("starting on the target: %w", err)
	}
	a.crashPoint("executor", "target-started")
	// The point of no return.
	commitErr := a.applyMigration(ctx, n, fsm.CommitMigration{ID: id, Holder: holder, ReadyAt: started.ReadyAt, At: time.Now()})
	if now, _ := a.migrationFact(n, id); !now.Phase.Committed() {
		if commitErr == nil {
			commitErr = fmt.Errorf("migration is %s after its commit", now.Phase)
		}
		return fmt.Errorf("committing: %w", commitErr)
	}
	ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseCommitted), Message: "committed: the target owns the volumes and serves the service IP"})
	a.crashPoint("executor", "committed")
	a.completeCommitted(context.WithoutCancel(ctx), n, id, ex)
	return nil
}

// sendVolume has the source stream one snapshot of a volume to the target
// (incremental from the newest snapshot both hold) and follows its
// progress. It returns the bytes sent.
func (a *Agent) sendVolume(ctx context.Context, n *cluster.Node, ex *execution, m fsm.Migration, v *fsm.MigrationVolume, snap string, round int) (uint64, error) {
	q := url.Values{"id": {m.ID}, "volume": {v.Name}, "snap": {snap}, "base": {v.LastSnapshot}}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The source writes a line every half second; silence means the
	// source or the path to it is gone.
	idle := time.AfterFunc(2*a.cfg.StallTimeout, cancel)
	defer idle.Stop()
	resp, done, err := a.callMachine(cctx, n, m.SourceID, http.MethodPost, rpcSend+"?"+q.Encode())
	if err != nil {
		return 0, err
	}
	defer done()
	defer resp.Body.Close()
	var total uint64
	if v.LastSnapshot == "" {
		total = v.TotalBytes
	}
	start := time.Now()
	dec := json.NewDecoder(resp.Body)
	for {
		var line sendLine
		if err := dec.Decode(&line); err != nil {
			return 0, fmt.Errorf("following the send of %s@%s: %w", v.Name, snap, err)
		}
		idle.Reset(2 * a.cfg.StallTimeout)
		if line.Error != "" {
			return 0, errors.New(line.Error)
		}
		ev := ctlapi.MigrationEvent{Kind: "progress", Phase: string(fsm.PhaseWarmCopy), Round: round, Volume: v.Name, Bytes: line.Bytes, Total: total}
		if round == 0 {
			ev.Phase = string(fsm.PhaseFinalCopy)
		}
		if s := time.Since(start).Seconds(); s > 0 {
			ev.Rate = float64(line.Bytes) / s
		}
		ex.emit(ev)
		if !line.Done {
			continue
		}
		if line.SourceGUID != line.TargetGUID {
			return 0, fmt.Errorf("volume %s@%s: GUID %d on the source, %d on the target", v.Name, snap, line.SourceGUID, line.TargetGUID)
		}
		v.BytesSent += line.Bytes
		v.LastSnapshot, v.GUID = snap, line.SourceGUID
		return line.Bytes, nil
	}
}

// completeCommitted finishes a committed migration: the source removes its
// container and keeps its copy, both prune to the final snapshot, and the
// migration is recorded done. Only forward: a machine that does not answer
// is left to its reconciler, which does the same when it is back.
func (a *Agent) completeCommitted(ctx context.Context, n *cluster.Node, id string, ex *execution) {
	m, ok := a.migrationFact(n, id)
	if !ok || m.Phase != fsm.PhaseCommitted {
		return
	}
	cleanup := func(machine, path string) {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		resp, done, err := a.callMachine(cctx, n, machine, http.MethodPost, path+"?id="+id)
		if err != nil {
			a.logger.Warn("cleanup after the commit; the machine's reconciler finishes it", "id", id, "machine", a.nameOf(machine), "err", err)
			return
		}
		resp.Body.Close()
		done()
	}
	cleanup(m.SourceID, rpcCleanupSource)
	a.crashPoint("executor", "cleanup")
	cleanup(m.TargetID, rpcCleanupTarget)
	for {
		err := a.applyMigration(ctx, n, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseDone, At: time.Now()})
		if now, _ := a.migrationFact(n, id); now.Phase == fsm.PhaseDone {
			break
		}
		a.logger.Warn("recording a committed migration as done; retrying", "id", id, "err", err)
		select {
		case <-a.ctx.Done():
			return // the next start of this daemon finishes it
		case <-time.After(time.Second):
		}
	}
	if ex != nil {
		ex.emit(ctlapi.MigrationEvent{Kind: "phase", Phase: string(fsm.PhaseDone), Message: "source container removed, source copy kept"})
	}
}

// abortMigration undoes a migration before its commit: it records why,
// has the target and the source undo their parts, and records it aborted.
// A machine that does not answer undoes its part when it is back (see the
// janitor): the abort does not wait for it.
func (a *Agent) abortMigration(ctx context.Context, n *cluster.Node, id string, cause error) {
	m, ok := a.migrationFact(n, id)
	if !ok || m.Phase.Committed() || m.Phase.Terminal() {
		return
	}
	if m.Phase != fsm.PhaseAborting {
		a.applyMigration(ctx, n, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborting, Error: cause.Error(), At: time.Now()})
	}
	for _, machine := range []string{m.TargetID, m.SourceID} {
		if g, ok := n.Member(machine); !ok || g.Liveness != cluster.LivenessAlive {
			a.logger.Warn("not undoing a migration on a machine gossip does not see alive; it undoes its part when back",
				"id", id, "machine", a.nameOf(machine))
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		resp, done, err := a.callMachine(cctx, n, machine, http.MethodPost, rpcAbort+"?id="+id)
		cancel()
		if err != nil {
			a.logger.Error("undoing a migration; that machine undoes its part when it is back", "id", id, "machine", a.nameOf(machine), "err", err)
			continue
		}
		resp.Body.Close()
		done()
	}
	if err := a.applyMigration(ctx, n, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborted, At: time.Now()}); err != nil {
		a.logger.Error("recording a migration aborted", "id", id, "err", err)
	}
}

func (a *Agent) migrationFact(n *cluster.Node, id string) (fsm.Migration, bool) {
	var m fsm.Migration
	var ok bool
	n.Read(func(s *fsm.State) { m, ok = s.Migration(id) })
	return m, ok
}

// requireMigration is the migration an operator named, or the error that
// says there is none.
func (a *Agent) requireMigration(n *cluster.Node, id string) (fsm.Migration, error) {
	m, ok := a.migrationFact(n, id)
	if !ok {
		return m, &ctlapi.APIError{Status: http.StatusNotFound, Code: "unknown_migration", Err: fmt.Errorf("no migration %q", id)}
	}
	return m, nil
}

func (a *Agent) migrationInfo(n *cluster.Node, id string) (ctlapi.MigrationInfo, error) {
	m, err := a.requireMigration(n, id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return a.toInfo(m), nil
}

func (a *Agent) toInfo(m fsm.Migration) ctlapi.MigrationInfo {
	executor, _, _ := strings.Cut(m.Holder, "/")
	info := ctlapi.MigrationInfo{ID: m.ID, Service: m.Namespace + "/" + m.Service, Source: a.nameOf(m.SourceID),
		Target: a.nameOf(m.TargetID), Executor: executor, Phase: string(m.Phase), Error: m.Error, RollbackOf: m.RollbackOf,
		Downtime: ctlapi.Duration(m.Downtime()), StartedAt: m.StartedAt, SourceStopped: m.SourceStoppedAt,
		TargetReady: m.TargetReadyAt, CommittedAt: m.CommittedAt, EndedAt: m.EndedAt, SourcePurgedAt: m.SourcePurgedAt}
	if m.Phase == fsm.PhaseDone && m.SourcePurgedAt.IsZero() {
		info.RetainedUntil = m.EndedAt.Add(a.cfg.SafetyWindow)
	}
	for _, v := range m.Volumes {
		info.Volumes = append(info.Volumes, ctlapi.MigrationVolume{Name: v.Name, BytesSent: v.BytesSent, FinalBytes: v.FinalBytes,
			TotalBytes: v.TotalBytes, Base: v.Base, Snapshot: v.LastSnapshot})
	}
	return info
}

// Migrations lists the migrations, oldest first.
func (a *Agent) Migrations(context.Context) ([]ctlapi.MigrationInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return nil, err
	}
	var ms []fsm.Migration
	n.Read(func(s *fsm.State) { ms = s.Migrations() })
	out := make([]ctlapi.MigrationInfo, 0, len(ms))
	for _, m := range ms {
		out = append(out, a.toInfo(m))
	}
	return out, nil
}

// Migration describes one migration.
func (a *Agent) Migration(_ context.Context, id string) (ctlapi.MigrationInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return a.migrationInfo(n, id)
}

// AbortMigration aborts a migration this daemon runs, before its commit.
func (a *Agent) AbortMigration(_ context.Context, id string) (ctlapi.MigrationInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	m, err := a.requireMigration(n, id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	info := a.toInfo(m)
	switch {
	case m.Phase.Committed():
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: "committed", Err: fmt.Errorf(
			"migration %s is committed: %s owns the volumes and serves %s now, so it only goes forward (roll back with `droverctl migrate rollback %s` once it is done)",
			id, info.Target, info.Service, id)}
	case m.Phase.Terminal():
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: "ended", Err: fmt.Errorf("migration %s is %s already", id, m.Phase)}
	}
	ex := a.execution(id)
	if ex == nil {
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: "not_here", Err: fmt.Errorf(
			"migration %s is run by %s: abort it there", id, info.Executor)}
	}
	ex.cancel(errAbortedByOperator)
	<-ex.done
	return ex.info, nil
}

// execution gives the running execution of a migration here, or nil.
func (a *Agent) execution(id string) *execution {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.execs[id]
}

// errMachineGone: gossip reports the machine a call waits on failed or
// left.
var errMachineGone = errors.New("machine is gone")

// callMachine makes a daemon-to-daemon call that fails as soon as gossip
// reports the machine failed or left: a killed daemon takes its
// WireGuard device with it, so its overlay address answers nothing, not
// even a reset, and a plain call would wait for TCP's own timeouts.
func (a *Agent) callMachine(ctx context.Context, n *cluster.Node, machine, method, path string) (*http.Response, context.CancelFunc, error) {
	cctx, cancel := context.WithCancelCause(ctx)
	stop := make(chan struct{})
	go func() {
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-cctx.Done():
				return
			case <-tick.C:
			}
			if g, ok := n.Member(machine); ok && (g.Liveness == cluster.LivenessFailed || g.Liveness == cluster.LivenessLeft) {
				cancel(fmt.Errorf("%w: %s is %s", errMachineGone, a.nameOf(machine), g.Liveness))
				return
			}
		}
	}()
	done := func() {
		close(stop)
		cancel(nil)
	}
	resp, err := n.CallRPC(cctx, machine, method, path, nil)
	if err != nil {
		if cause := context.Cause(cctx); cause != nil && errors.Is(cause, errMachineGone) {
			err = fmt.Errorf("%w (%v)", cause, err)
		}
		done()
		return nil, nil, err
	}
	return resp, done, nil
}

func mibs(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
