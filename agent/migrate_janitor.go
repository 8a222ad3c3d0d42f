package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// runMigrationJanitor finishes what migrations left behind, on every
// machine, once its facts have caught up:
//
//   - migrations this daemon ran before it restarted (its name is in the
//     lock holder, no goroutine runs them now): aborted before the
//     commit, completed after;
//   - on the leader, migrations whose executor's lease on the namespace
//     lock ran out: the same;
//   - on a target, what an aborted migration left here while this daemon
//     was away: container, staging copies, adopted datasets;
//   - on a source, the copies kept past the safety window: destroyed;
//   - drains: resumed by the machine that ran them, reported by the
//     leader when that machine is gone.
func (a *Agent) runMigrationJanitor(ctx context.Context, n *cluster.Node) {
	defer a.wg.Done()
	tick := time.NewTicker(a.cfg.JanitorInterval)
	defer tick.Stop()
	if !a.waitCaughtUp(ctx, n, tick.C, "migration janitor") {
		return
	}
	undone := map[string]bool{}         // aborted migrations this process has undone here
	goneSince := map[string]time.Time{} // drain executors gossip sees gone, since
	for {
		a.finishOrphans(ctx, n)
		a.resumeDrains(ctx, n, goneSince)
		if w := a.currentWork(); w != nil {
			a.undoLeftovers(ctx, n, w, undone)
			a.purgeExpired(ctx, n, w)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// finishOrphans aborts or completes the migrations nobody runs.
func (a *Agent) finishOrphans(ctx context.Context, n *cluster.Node) {
	leader := false
	if st, err := n.Status(); err == nil && st.Role == cluster.RoleLeader {
		leader = true
	}
	mine := a.cfg.Name + "/migrate/"
	var orphans []fsm.Migration
	var why []string
	now := time.Now()
	a.mu.Lock()
	running := make(map[string]bool, len(a.execs))
	for id := range a.execs {
		running[id] = true
	}
	a.mu.Unlock()
	n.Read(func(s *fsm.State) {
		for _, m := range s.Migrations() {
			if m.Phase.Terminal() || running[m.ID] {
				continue
			}
			if strings.HasPrefix(m.Holder, mine) {
				orphans, why = append(orphans, m), append(why, "the daemon running it restarted")
				continue
			}
			if l, ok := s.Lock(m.Namespace); leader && (!ok || l.Holder != m.Holder || !l.ExpiresAt.After(now)) {
				orphans, why = append(orphans, m), append(why, "the executor's lease on the namespace lock ran out")
			}
		}
	})
	for i, m := range orphans {
		if m.Phase.Committed() {
			a.logger.Info("completing a committed migration nobody runs", "id", m.ID, "why", why[i])
			a.completeCommitted(ctx, n, m.ID, nil)
		} else {
			a.logger.Warn("aborting a migration nobody runs", "id", m.ID, "phase", m.Phase, "why", why[i])
			a.abortMigration(ctx, n, m.ID, errors.New(why[i]))
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		n.Apply(rctx, fsm.ReleaseLock{Namespace: m.Namespace, Holder: m.Holder, At: time.Now()})
		cancel()
	}
}

// undoLeftovers removes, on this machine, what aborted migrations left
// when this daemon could not be told (it was down or cut off): each
// aborted migration that targeted this machine is undone once per daemon
// start, and staging copies of migrations that ended are destroyed.
func (a *Agent) undoLeftovers(ctx context.Context, n *cluster.Node, w *workloads, undone map[string]bool) {
	var calls []migrationCall
	ended := map[string]bool{}
	n.Read(func(s *fsm.State) {
		for _, m := range s.Migrations() {
			if m.Phase.Terminal() {
				ended[m.ID] = true
			}
			if m.Phase == fsm.PhaseAborted && m.TargetID == a.machineID && !undone[m.ID] {
				sv, _ := s.Service(m.Namespace, m.Service)
				calls = append(calls, migrationCall{m: m, sv: sv, w: w})
			}
		}
	})
	failed := map[string]bool{}
	for _, c := range calls {
		if err := a.undoTarget(ctx, c); err != nil {
			a.logger.Warn("undoing what an aborted migration left here; retrying", "id", c.m.ID, "err", err)
			failed[c.m.ID] = true
			continue
		}
		undone[c.m.ID] = true
	}
	if w.vols == nil {
		return
	}
	staging, err := w.vols.Staging()
	if err != nil {
		a.logger.Warn("listing incoming copies", "err", err)
		return
	}
	for _, ds := range staging {
		id, _, _ := strings.Cut(path.Base(ds), "-")
		if !ended[id] || failed[id] {
			continue // running, not known here yet, or to be undone first
		}
		a.logger.Info("destroying the incoming copy of a migration that ended", "id", id, "dataset", ds)
		if err := w.vols.DestroyDataset(ds); err != nil {
			a.logger.Warn("destroying an incoming copy", "dataset", ds, "err", err)
		}
	}
}

// purgeExpired destroys the copies this machine kept as the source of
// done migrations once the safety window is over, and records it.
func (a *Agent) purgeExpired(ctx context.Context, n *cluster.Node, w *workloads) {
	var due []migrationCall
	now := time.Now()
	n.Read(func(s *fsm.State) {
		for _, m := range s.Migrations() {
			if m.Phase == fsm.PhaseDone && m.SourceID == a.machineID && m.SourcePurgedAt.IsZero() && now.After(m.EndedAt.Add(a.cfg.SafetyWindow)) {
				sv, _ := s.Service(m.Namespace, m.Service)
				due = append(due, migrationCall{m: m, sv: sv, w: w})
			}
		}
	})
	for _, c := range due {
		if err := a.purgeLocal(c); err != nil {
			a.logger.Warn("purging a kept source copy after the safety window", "id", c.m.ID, "err", err)
			continue
		}
		if _, err := n.Apply(ctx, fsm.PurgeSource{ID: c.m.ID, At: time.Now()}); err != nil {
			a.logger.Warn("recording a purged source copy", "id", c.m.ID, "err", err)
			continue
		}
		a.logger.Info("safety window over: source copy purged", "id", c.m.ID, "service", c.m.Namespace+"/"+c.m.Service,
			"window", a.cfg.SafetyWindow, "ended", c.m.EndedAt)
	}
}

// Rollback moves a done migration's service back to its source inside the
// safety window, sending only what changed since the copy the source kept.
func (a *Agent) Rollback(ctx context.Context, id string, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	m, err := a.requireMigration(n, id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	var sv fsm.Service
	n.Read(func(s *fsm.State) { sv, _ = s.Service(m.Namespace, m.Service) })
	refuse := func(format string, args ...any) (ctlapi.MigrationInfo, error) {
		return ctlapi.MigrationInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: "no_rollback",
			Err: fmt.Errorf("rollback of %s: "+format, append([]any{id}, args...)...)}
	}
	switch {
	case m.Phase != fsm.PhaseDone:
		return refuse("it is %s: only a done migration can be rolled back", m.Phase)
	case !m.SourcePurgedAt.IsZero():
		return refuse("the copy kept on %s was purged at %s", a.nameOf(m.SourceID), m.SourcePurgedAt.Format(time.RFC3339))
	case time.Now().After(m.EndedAt.Add(a.cfg.SafetyWindow)):
		return refuse("the safety window (%s) ended at %s", a.cfg.SafetyWindow, m.EndedAt.Add(a.cfg.SafetyWindow).Format(time.RFC3339))
	case sv.MachineID != m.TargetID:
		return refuse("%s/%s has moved since: it runs on %s", m.Namespace, m.Service, a.nameOf(sv.MachineID))
	}
	return a.migrate(ctx, ctlapi.MigrateRequest{Service: m.Namespace + "/" + m.Service, To: a.nameOf(m.SourceID)}, id, emit)
}

// PurgeSource destroys the copy a done migration kept on its source.
func (a *Agent) PurgeSource(ctx context.Context, id string) (ctlapi.MigrationInfo, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	m, err := a.requireMigration(n, id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	if m.Phase != fsm.PhaseDone {
		return a.toInfo(m), &ctlapi.APIError{Status: http.StatusConflict, Code: "not_done", Err: fmt.Errorf("migration %s is %s: only a done migration kept a source copy", id, m.Phase)}
	}
	if m.SourcePurgedAt.IsZero() {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		resp, err := n.CallRPC(cctx, m.SourceID, http.MethodPost, rpcPurgeSource+"?id="+id, nil)
		cancel()
		if err != nil {
			return a.toInfo(m), fmt.Errorf("purging the copy on %s: %w", a.nameOf(m.SourceID), err)
		}
		resp.Body.Close()
		if _, err := n.Apply(ctx, fsm.PurgeSource{ID: id, At: time.Now()}); err != nil {
			return a.toInfo(m), fmt.Errorf("recording the purge: %w", err)
		}
	}
	return a.migrationInfo(n, id)
}
