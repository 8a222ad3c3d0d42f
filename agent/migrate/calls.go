package migrate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
)

// Register puts this machine's side of every migration call on the RPC
// server; call it before the server starts.
func (m *Migrator) Register() {
	s := m.d.Server
	peer.HandleStream(s, routeSend, m.handleSend)
	peer.HandleUpload(s, routeReceive, m.handleReceive)
	peer.Handle(s, routeStopSource, withMigration(m, m.handleStopSource))
	peer.Handle(s, routeStartTarget, withMigration(m, m.handleStartTarget))
	peer.Handle(s, routePrepareTarget, withMigration(m, m.handlePrepareTarget))
	peer.HandleStream(s, routeCutover, m.handleCutover)
	peer.Handle(s, routeFlush, withMigration(m, m.handleFlush))
	peer.HandleStream(s, routePrepareImage, m.handlePrepareImage)
	peer.HandleStream(s, routeSendImage, m.handleSendImage)
	peer.HandleUpload(s, routeLoadImage, m.handleLoadImage)
	peer.Handle(s, routeAbort, withMigration(m, answerless(m.handleAbort)))
	peer.Handle(s, routeCleanupSource, withMigration(m, answerless(m.handleCleanupSource)))
	peer.Handle(s, routeCleanupTarget, withMigration(m, answerless(m.handleCleanupTarget)))
	peer.Handle(s, routePurgeSource, withMigration(m, answerless(m.handlePurgeSource)))
	peer.Handle(s, routeLocalFacts, m.handleLocalFacts)
}

// migrationCall is what every migration handler starts from: the
// migration a call names and its service.
type migrationCall struct {
	m  fsm.Migration
	sv fsm.Service
}

// withMigration serves a call that names a migration with h, given the
// migration's facts.
func withMigration[Resp any](m *Migrator, h func(context.Context, migrationCall) (Resp, error)) func(context.Context, string, migrationRef) (Resp, error) {
	return func(ctx context.Context, _ string, req migrationRef) (Resp, error) {
		c, err := m.lookup(ctx, req.ID)
		if err != nil {
			var zero Resp
			return zero, err
		}
		return h(ctx, c)
	}
}

// answerless is a handler whose answer is its success only.
func answerless(h func(context.Context, migrationCall) error) func(context.Context, migrationCall) (done, error) {
	return func(ctx context.Context, c migrationCall) (done, error) { return done{}, h(ctx, c) }
}

// lookup finds the migration a call names, and its service. The executor
// acts on facts it just wrote; lookup waits until this machine has them
// too (a daemon that just started may need a moment), so the checks after
// it see the phase the executor asks about.
func (m *Migrator) lookup(ctx context.Context, id string) (migrationCall, error) {
	var c migrationCall
	var ok bool
	deadline := time.Now().Add(m.lookupWait)
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		caughtUp := m.d.Facts.CaughtUp(cctx)
		cancel()
		m.d.Facts.Read(func(s *fsm.State) {
			if c.m, ok = s.Migration(id); ok {
				c.sv, _ = s.Service(c.m.Namespace, c.m.Service)
			}
		})
		if (ok && caughtUp == nil) || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !ok {
		return migrationCall{}, fmt.Errorf("%w %q", ErrNoMigration, id)
	}
	return c, nil
}

// requireRunning checks that a migration still runs before its commit and
// that this machine is the one of its facts that role names.
func (m *Migrator) requireRunning(f fsm.Migration, machineID string, role *peer.Error) error {
	if f.Phase.Terminal() || f.Phase.Committed() {
		return fmt.Errorf("migration %s is %s: %w", f.ID, f.Phase, ErrNotRunning)
	}
	if machineID != m.cfg.Self {
		return fmt.Errorf("%w of migration %s", role, f.ID)
	}
	return nil
}

// finalSnapshot is the name of a migration's last snapshot: taken after
// the source stopped, kept on both sides as the base of a rollback.
func finalSnapshot(id string) string { return snapshotsOf(id) + "final" }

// snapshotsOf starts the name of every snapshot migration id takes: its
// rounds' and its final one.
func snapshotsOf(id string) string { return volume.SnapshotPrefix + id + "-" }

// ownsVolume tells whether the facts make this machine a volume's owner.
func (m *Migrator) ownsVolume(ns, vol string) bool {
	var owner string
	m.d.Facts.Read(func(s *fsm.State) {
		if v, ok := s.Volume(ns, vol); ok {
			owner = v.OwnerID
		}
	})
	return owner == m.cfg.Self
}

// findContainer is the service's container on this machine, if any.
func (m *Migrator) findContainer(ctx context.Context, ns, svc string) (runtime.Container, error) {
	cs, err := m.d.Containers.List(ctx)
	if err != nil {
		return runtime.Container{}, err
	}
	for _, c := range cs {
		if c.Namespace == ns && c.Service == svc {
			return c, nil
		}
	}
	return runtime.Container{}, nil
}

// removeContainer removes the service's container and its service IP
// from this machine, if this machine does not run the service.
func (m *Migrator) removeContainer(ctx context.Context, c migrationCall) error {
	if c.sv.MachineID == m.cfg.Self {
		return nil
	}
	ctr, err := m.findContainer(ctx, c.m.Namespace, c.m.Service)
	if err != nil {
		return err
	}
	if ctr.ID != "" {
		if err := m.d.Containers.Remove(ctx, ctr.ID, 10*time.Second); err != nil {
			return err
		}
	}
	if c.sv.ServiceIP.IsValid() {
		return m.d.Loopback.Remove(c.sv.ServiceIP)
	}
	return nil
}

// pruneSnapshots keeps only a migration's final snapshot of each of its
// volumes on this machine.
func (m *Migrator) pruneSnapshots(c migrationCall) error {
	if !m.holdsVolumes() {
		return nil
	}
	var errs []error
	for _, v := range c.m.Volumes {
		if m.d.Datasets.Exists(m.d.Datasets.Dataset(c.m.Namespace, v.Name)) {
			errs = append(errs, m.d.Copies.PruneSnapshots(c.m.Namespace, v.Name, finalSnapshot(c.m.ID)))
		}
	}
	return errors.Join(errs...)
}

// handleAbort (source or target): undo this machine's part before the
// commit.
func (m *Migrator) handleAbort(ctx context.Context, c migrationCall) error {
	if c.m.Phase.Committed() {
		return fmt.Errorf("migration %s is committed: it only goes forward: %w", c.m.ID, ErrNotRunning)
	}
	switch m.cfg.Self {
	case c.m.TargetID:
		return m.undoTarget(ctx, c)
	case c.m.SourceID:
		return m.undoSource(ctx, c)
	}
	return fmt.Errorf("this machine takes no part in migration %s: %w", c.m.ID, ErrNotTarget)
}
