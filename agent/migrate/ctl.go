package migrate

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
)

// The operator's view of migrations: the control API's backend calls
// these.

// fact reads one migration's facts.
func (m *Migrator) fact(id string) (fsm.Migration, bool) {
	var f fsm.Migration
	var ok bool
	m.d.Facts.Read(func(s *fsm.State) { f, ok = s.Migration(id) })
	return f, ok
}

// require is the migration an operator named, or the error that says
// there is none.
func (m *Migrator) require(id string) (fsm.Migration, error) {
	f, ok := m.fact(id)
	if !ok {
		return f, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownMigration, Err: fmt.Errorf("no migration %q", id)}
	}
	return f, nil
}

func (m *Migrator) nameOf(id string) string { return factview.NameOf(m.d.Members, m.d.Facts, id) }

// Info describes a migration as the operator sees it.
func (m *Migrator) Info(f fsm.Migration) ctlapi.MigrationInfo {
	executor, _, _ := strings.Cut(f.Holder, "/")
	info := ctlapi.MigrationInfo{ID: f.ID, Service: f.Namespace + "/" + f.Service, Source: m.nameOf(f.SourceID),
		Target: m.nameOf(f.TargetID), Executor: executor, Phase: string(f.Phase), Error: f.Error, RollbackOf: f.RollbackOf,
		Downtime: ctlapi.Duration(f.Downtime()), StartedAt: f.StartedAt, SourceStopped: f.SourceStoppedAt,
		TargetReady: f.TargetReadyAt, CommittedAt: f.CommittedAt, EndedAt: f.EndedAt, SourcePurgedAt: f.SourcePurgedAt}
	if f.Cutover != nil {
		c := cutoverInfo(*f.Cutover)
		info.Cutover = &c
	}
	if f.Phase == fsm.PhaseDone && f.SourcePurgedAt.IsZero() {
		info.RetainedUntil = f.EndedAt.Add(m.cfg.SafetyWindow)
	}
	for _, v := range f.Volumes {
		info.Volumes = append(info.Volumes, ctlapi.MigrationVolume{Name: v.Name, BytesSent: v.BytesSent, FinalBytes: v.FinalBytes,
			TotalBytes: v.TotalBytes, Base: v.Base, Snapshot: v.LastSnapshot})
	}
	return info
}

// cutoverInfo is a downtime breakdown as the operator sees it.
func cutoverInfo(c fsm.Cutover) ctlapi.Cutover {
	return ctlapi.Cutover{Prepared: ctlapi.Duration(c.Prepared), Stop: ctlapi.Duration(c.Stop),
		FinalSnapshot: ctlapi.Duration(c.FinalSnapshot), FinalSend: ctlapi.Duration(c.FinalSend), Adopt: ctlapi.Duration(c.Adopt),
		Start: ctlapi.Duration(c.Start), Ready: ctlapi.Duration(c.Ready), Commit: ctlapi.Duration(c.Commit),
		Total: ctlapi.Duration(c.Total), FinalBytes: c.FinalBytes, Held: c.Held}
}

// List lists the migrations, oldest first.
func (m *Migrator) List(context.Context) ([]ctlapi.MigrationInfo, error) {
	var fs []fsm.Migration
	m.d.Facts.Read(func(s *fsm.State) { fs = s.Migrations() })
	out := make([]ctlapi.MigrationInfo, 0, len(fs))
	for _, f := range fs {
		out = append(out, m.Info(f))
	}
	return out, nil
}

// Show describes one migration.
func (m *Migrator) Show(_ context.Context, id string) (ctlapi.MigrationInfo, error) {
	f, err := m.require(id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return m.Info(f), nil
}

// Abort aborts a migration this daemon runs, before its commit.
func (m *Migrator) Abort(_ context.Context, id string) (ctlapi.MigrationInfo, error) {
	f, err := m.require(id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	info := m.Info(f)
	switch {
	case f.Phase.Committed():
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeCommitted, Err: fmt.Errorf(
			"migration %s is committed: %s owns the volumes and serves %s now, so it only goes forward (roll back with `droverctl migrate rollback %s` once it is done)",
			id, info.Target, info.Service, id)}
	case f.Phase.Terminal():
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeEnded, Err: fmt.Errorf("migration %s is %s already", id, f.Phase)}
	}
	ex := m.execution(id)
	if ex == nil {
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeNotHere, Err: fmt.Errorf(
			"migration %s is run by %s: abort it there", id, info.Executor)}
	}
	ex.cancel(errAbortedByOperator)
	<-ex.done
	return ex.info, nil
}

// Rollback moves a done migration's service back to its source inside the
// safety window, sending only what changed since the copy the source kept.
func (m *Migrator) Rollback(ctx context.Context, id string, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	f, err := m.require(id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	var sv fsm.Service
	m.d.Facts.Read(func(s *fsm.State) { sv, _ = s.Service(f.Namespace, f.Service) })
	if why := rollbackRefusal(f, sv, time.Now(), m.cfg.SafetyWindow, m.nameOf); why != "" {
		return ctlapi.MigrationInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeNoRollback,
			Err: fmt.Errorf("rollback of %s: %s", id, why)}
	}
	// A rollback puts the service back where it ran: it converges as a
	// move does, but is never refused for its downtime.
	return m.migrate(ctx, ctlapi.MigrateRequest{Service: f.Namespace + "/" + f.Service, To: m.nameOf(f.SourceID), MaxDowntime: ctlapi.NoDowntimeBudget}, id, emit)
}

// rollbackRefusal says why a migration cannot be rolled back now; "" when
// it can.
func rollbackRefusal(f fsm.Migration, sv fsm.Service, now time.Time, window time.Duration, nameOf func(string) string) string {
	switch {
	case f.Phase != fsm.PhaseDone:
		return fmt.Sprintf("it is %s: only a done migration can be rolled back", f.Phase)
	case !f.SourcePurgedAt.IsZero():
		return fmt.Sprintf("the copy kept on %s was purged at %s", nameOf(f.SourceID), f.SourcePurgedAt.Format(time.RFC3339))
	case now.After(f.EndedAt.Add(window)):
		return fmt.Sprintf("the safety window (%s) ended at %s", window, f.EndedAt.Add(window).Format(time.RFC3339))
	case sv.MachineID != f.TargetID:
		return fmt.Sprintf("%s/%s has moved since: it runs on %s", f.Namespace, f.Service, nameOf(sv.MachineID))
	}
	return ""
}

// PurgeSource destroys the copy a done migration kept on its source.
func (m *Migrator) PurgeSource(ctx context.Context, id string) (ctlapi.MigrationInfo, error) {
	f, err := m.require(id)
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	if f.Phase != fsm.PhaseDone {
		return m.Info(f), &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeNotDone, Err: fmt.Errorf("migration %s is %s: only a done migration kept a source copy", id, f.Phase)}
	}
	if f.SourcePurgedAt.IsZero() {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		_, err := routePurgeSource.Call(cctx, m.d.Peers, f.SourceID, migrationRef{ID: id})
		cancel()
		if err != nil {
			return m.Info(f), fmt.Errorf("purging the copy on %s: %w", m.nameOf(f.SourceID), err)
		}
		if _, err := m.d.Facts.Apply(ctx, fsm.PurgeSource{ID: id, At: time.Now()}); err != nil {
			return m.Info(f), fmt.Errorf("recording the purge: %w", err)
		}
	}
	return m.Show(ctx, id)
}
