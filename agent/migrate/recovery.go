package migrate

import (
	"context"
	"errors"
	"path"
	"strings"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/internal/nslock"
)

// runRecovery finishes what migrations left behind, on every machine,
// once its facts have caught up, every JanitorInterval:
//
//   - migrations this daemon ran before it restarted (its name is in the
//     lock holder, no goroutine runs them now): aborted before the
//     commit, completed after;
//   - on the leader, migrations whose executor's lease on the namespace
//     lock ran out: the same;
//   - on a target, what an aborted migration left here while this daemon
//     was away: container, staging copies, adopted datasets;
//   - on a source, the copies kept past the safety window: destroyed.
func (m *Migrator) runRecovery(ctx context.Context) {
	tick := time.NewTicker(m.cfg.JanitorInterval)
	defer tick.Stop()
	if !factview.WaitCaughtUp(ctx, m.d.Facts, tick.C, m.log, "migration recovery") {
		return
	}
	undone := map[string]bool{} // aborted migrations this process has undone here
	first := true
	for {
		m.finishOrphans(ctx)
		if m.holdsVolumes() {
			m.undoLeftovers(ctx, undone)
			m.purgeExpired(ctx)
		}
		if first {
			close(m.recovered)
			first = false
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// orphan is a migration nobody runs, and why it is one.
type orphan struct {
	m   fsm.Migration
	why string
}

// findOrphans picks the migrations nobody runs: a pure function of the
// facts, the migrations this daemon runs, its holder prefix and whether
// it leads.
func findOrphans(s *fsm.State, running map[string]bool, holderPrefix string, leader bool, now time.Time) []orphan {
	var out []orphan
	for _, m := range s.Migrations() {
		if m.Phase.Terminal() || running[m.ID] {
			continue
		}
		if strings.HasPrefix(m.Holder, holderPrefix) {
			out = append(out, orphan{m, "the daemon running it restarted"})
			continue
		}
		if l, ok := s.Lock(m.Namespace); leader && (!ok || l.Holder != m.Holder || !l.ExpiresAt.After(now)) {
			out = append(out, orphan{m, "the executor's lease on the namespace lock ran out"})
		}
	}
	return out
}

// finishOrphans aborts the migrations nobody runs that did not commit,
// completes those that did, and releases their locks.
func (m *Migrator) finishOrphans(ctx context.Context) {
	running, leader := m.running(), m.d.Members.IsLeader()
	var orphans []orphan
	m.d.Facts.Read(func(s *fsm.State) {
		orphans = findOrphans(s, running, m.cfg.Name+"/migrate/", leader, time.Now())
	})
	for _, o := range orphans {
		if o.m.Phase.Committed() {
			m.log.Info("completing a committed migration nobody runs", "id", o.m.ID, "why", o.why)
			m.complete(ctx, o.m.ID, nil, nil)
		} else {
			m.log.Warn("aborting a migration nobody runs", "id", o.m.ID, "phase", o.m.Phase, "why", o.why)
			m.abort(ctx, o.m.ID, errors.New(o.why))
		}
		nslock.Release(ctx, m.d.Facts, o.m.Namespace, o.m.Holder, m.log)
	}
	// The facts first, then what runs: a migration that starts between
	// the two runs already (it registers before it takes its lock).
	var stale []fsm.Lock
	m.d.Facts.Read(func(s *fsm.State) { stale = staleLocks(s, nil, m.cfg.Name+"/migrate/") })
	running = m.running()
	for _, l := range stale {
		if running[strings.TrimPrefix(l.Holder, m.cfg.Name+"/migrate/")] {
			continue
		}
		m.log.Info("releasing the lock of a migration that ended while this daemon was away", "namespace", l.Namespace, "holder", l.Holder)
		nslock.Release(ctx, m.d.Facts, l.Namespace, l.Holder, m.log)
	}
}

// staleLocks are the namespace locks this daemon took for migrations
// that have ended (or are gone) and that it no longer runs: a daemon
// killed just as its migration ended left them held until their lease
// ran out, and the next move of the namespace was refused meanwhile.
func staleLocks(s *fsm.State, running map[string]bool, holderPrefix string) []fsm.Lock {
	var out []fsm.Lock
	for _, l := range s.Locks() {
		id, ok := strings.CutPrefix(l.Holder, holderPrefix)
		if !ok || running[id] {
			continue
		}
		if mg, known := s.Migration(id); !known || mg.Phase.Terminal() {
			out = append(out, l)
		}
	}
	return out
}

// undoLeftovers removes, on this machine, what aborted migrations left
// when this daemon could not be told (it was down or cut off): each
// aborted migration that targeted this machine is undone once per daemon
// start, and staging copies of migrations that ended are destroyed.
func (m *Migrator) undoLeftovers(ctx context.Context, undone map[string]bool) {
	var calls []migrationCall
	ended := map[string]bool{}
	m.d.Facts.Read(func(s *fsm.State) {
		for _, f := range s.Migrations() {
			if f.Phase.Terminal() {
				ended[f.ID] = true
			}
			if f.Phase == fsm.PhaseAborted && f.TargetID == m.cfg.Self && !undone[f.ID] {
				sv, _ := s.Service(f.Namespace, f.Service)
				calls = append(calls, migrationCall{m: f, sv: sv})
			}
		}
	})
	failed := map[string]bool{}
	for _, c := range calls {
		if err := m.undoTarget(ctx, c); err != nil {
			m.log.Warn("undoing what an aborted migration left here; retrying", "id", c.m.ID, "err", err)
			failed[c.m.ID] = true
			continue
		}
		undone[c.m.ID] = true
	}
	staging, err := m.d.Datasets.Staging()
	if err != nil {
		m.log.Warn("listing incoming copies", "err", err)
		return
	}
	for _, ds := range staging {
		id, _, _ := strings.Cut(path.Base(ds), "-")
		if !ended[id] || failed[id] {
			continue // running, not known here yet, or to be undone first
		}
		m.log.Info("destroying the incoming copy of a migration that ended", "id", id, "dataset", ds)
		if err := m.d.Datasets.DestroyDataset(ds); err != nil {
			m.log.Warn("destroying an incoming copy", "dataset", ds, "err", err)
		}
	}
}

// purgeExpired destroys the copies this machine kept as the source of
// done migrations once the safety window is over, and records it.
func (m *Migrator) purgeExpired(ctx context.Context) {
	var due []migrationCall
	now := time.Now()
	m.d.Facts.Read(func(s *fsm.State) {
		for _, f := range s.Migrations() {
			if f.Phase == fsm.PhaseDone && f.SourceID == m.cfg.Self && f.SourcePurgedAt.IsZero() && now.After(f.EndedAt.Add(m.cfg.SafetyWindow)) {
				sv, _ := s.Service(f.Namespace, f.Service)
				due = append(due, migrationCall{m: f, sv: sv})
			}
		}
	})
	for _, c := range due {
		if err := m.purgeLocal(c); err != nil {
			m.log.Warn("purging a kept source copy after the safety window", "id", c.m.ID, "err", err)
			continue
		}
		if _, err := m.d.Facts.Apply(ctx, fsm.PurgeSource{ID: c.m.ID, At: time.Now()}); err != nil {
			m.log.Warn("recording a purged source copy", "id", c.m.ID, "err", err)
			continue
		}
		m.log.Info("safety window over: source copy purged", "id", c.m.ID, "service", c.m.Namespace+"/"+c.m.Service,
			"window", m.cfg.SafetyWindow, "ended", c.m.EndedAt)
	}
}

// watchCrashPhases serves the one crash point that is no step of this
// daemon's own: the source's "target-started", reached while the target
// starts the service and the source does nothing. It watches the facts
// and fires when a migration from this machine enters target-starting.
// It runs only in test builds with a crash point set.
func (m *Migrator) watchCrashPhases(ctx context.Context) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if m.cfg.Crash.Armed() != "source:target-started" {
			continue
		}
		m.d.Facts.Read(func(s *fsm.State) {
			for _, f := range s.Migrations() {
				if f.SourceID == m.cfg.Self && f.Phase == fsm.PhaseTargetStarting {
					m.cfg.Crash.Hit("source", "target-started")
				}
			}
		})
	}
}
