package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/iocount"
)

// The source's side of a migration: it sends snapshots, stops its
// container, and after the commit removes it and keeps its copy for the
// safety window.

// handleSend (source): snapshot a volume and stream it to the target,
// answering with a progress line every half second and the outcome last.
// A stream that moves no byte for the stall timeout is cancelled.
func (m *Migrator) handleSend(ctx context.Context, _ string, req sendRequest, emit func(sendProgress)) (sendResult, error) {
	c, err := m.lookup(ctx, req.ID)
	if err == nil {
		err = m.requireRunning(c.m, c.m.SourceID, ErrNotSource)
	}
	if err == nil {
		err = m.requireVolumes()
	}
	if err != nil {
		return sendResult{}, err
	}
	res, _, err := m.sendSnapshot(ctx, c, req, emit)
	return res, err
}

// handleCutover (source): stop the container, then snapshot every volume
// and send its final increment to the target, in one call: nothing
// crosses the network between the stop and the sends but the streams.
// The first progress line says the container stopped.
func (m *Migrator) handleCutover(ctx context.Context, _ string, req cutoverRequest, emit func(cutoverProgress)) (cutoverResult, error) {
	c, err := m.lookup(ctx, req.ID)
	if err == nil {
		err = m.requireRunning(c.m, c.m.SourceID, ErrNotSource)
	}
	if err == nil && len(req.Volumes) > 0 {
		err = m.requireVolumes()
	}
	if err != nil {
		return cutoverResult{}, err
	}
	for _, v := range req.Volumes {
		if !slices.ContainsFunc(c.m.Volumes, func(mv fsm.MigrationVolume) bool { return mv.Name == v.Volume }) || v.ID != c.m.ID || v.Snap != finalSnapshot(c.m.ID) {
			return cutoverResult{}, fmt.Errorf("cutover of migration %s asks for %s@%s of migration %q: %w", c.m.ID, v.Volume, v.Snap, v.ID, ErrNotSource)
		}
	}
	began := time.Now()
	st, engineStop, err := m.haltSource(ctx, c)
	if err != nil {
		return cutoverResult{}, err
	}
	res := cutoverResult{Stop: st, Stopped: time.Since(began)}
	emit(cutoverProgress{Stopped: true})
	// The volumes' final increments go side by side.
	sendsBegan := time.Now()
	var mu sync.Mutex
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(req.Volumes))
	res.Volumes = make([]finalIncrement, len(req.Volumes))
	for i, v := range req.Volumes {
		wg.Go(func() {
			began := time.Now()
			sent, snapshotTook, err := m.sendSnapshot(sctx, c, v, func(p sendProgress) {
				mu.Lock()
				defer mu.Unlock()
				emit(cutoverProgress{Volume: v.Volume, Bytes: p.Bytes})
			})
			if err != nil {
				errs[i] = err
				cancel()
				return
			}
			res.Volumes[i] = finalIncrement{Volume: v.Volume, Sent: sent, Snapshot: snapshotTook, Send: time.Since(began) - snapshotTook}
		})
	}
	wg.Wait()
	res.Sends = time.Since(sendsBegan)
	// The engine finishes its stop (network, mounts) on its own time: the
	// target does not wait for it.
	stopped := make(chan struct{})
	m.mu.Lock()
	m.stopping[c.m.ID] = stopped
	m.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer close(stopped)
		if err := engineStop(); err != nil {
			m.log.Warn("the engine's stop of the source container, after its processes ended", "migration", c.m.ID, "err", err)
		}
	}()
	if err := errors.Join(errs...); err != nil {
		return cutoverResult{}, err
	}
	return res, nil
}

// sendSnapshot snapshots one volume and streams it to the target,
// reporting progress every half second; it returns the outcome and how
// long the snapshot took.
func (m *Migrator) sendSnapshot(ctx context.Context, c migrationCall, req streamRequest, emit func(sendProgress)) (sendResult, time.Duration, error) {
	began := time.Now()
	snap, err := m.d.Streams.Snapshot(c.m.Namespace, req.Volume, req.Snap)
	if err != nil {
		return sendResult{}, 0, err
	}
	snapshotTook := time.Since(began)
	point := "warm-copy"
	if req.Snap == finalSnapshot(c.m.ID) {
		point = "final-send"
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	pr, pw := io.Pipe()
	var sent atomic.Uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		cw := &countingWriter{w: pw, n: &sent, first: func() { m.cfg.Crash.Hit("source", point) }}
		pw.CloseWithError(m.d.Streams.Send(c.m.Namespace, req.Volume, req.Snap, req.Base, cw))
	}()
	type outcome struct {
		guid uint64
		err  error
	}
	answered := make(chan outcome, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		got, err := routeReceive.Call(ctx, m.d.Peers, c.m.TargetID, req, pr)
		pr.CloseWithError(errors.New("the target's answer came"))
		answered <- outcome{guid: got.TargetGUID, err: err}
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	last, lastMoved := uint64(0), time.Now()
	var res outcome
wait:
	for {
		select {
		case res = <-answered:
			break wait
		case <-tick.C:
			n := sent.Load()
			if n != last {
				last, lastMoved = n, time.Now()
			} else if time.Since(lastMoved) > m.cfg.StallTimeout {
				cancel(fmt.Errorf("%w: no byte for %s", ErrStalled, m.cfg.StallTimeout))
			}
			emit(sendProgress{Bytes: n})
		}
	}
	cancel(nil)
	wg.Wait()
	if res.err != nil {
		err := res.err
		if cause := context.Cause(ctx); cause != nil && errors.Is(cause, ErrStalled) {
			err = cause
		}
		return sendResult{}, 0, fmt.Errorf("streaming %s/%s@%s to the target: %w", c.m.Namespace, req.Volume, req.Snap, err)
	}
	return sendResult{Bytes: sent.Load(), SourceGUID: snap.GUID, TargetGUID: res.guid}, snapshotTook, nil
}

// countingWriter counts what passes and calls first once, after the first
// write.
type countingWriter struct {
	w     io.Writer
	n     *atomic.Uint64
	first func()
	once  sync.Once
}

func (c *countingWriter) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	c.n.Add(uint64(k))
	if k > 0 && c.first != nil {
		c.once.Do(c.first)
	}
	return k, err
}

// handleFlush (source, during the warm copy): run the service's flush
// command in its container and say how it ended.
func (m *Migrator) handleFlush(ctx context.Context, c migrationCall) (flushResult, error) {
	if err := m.requireRunning(c.m, c.m.SourceID, ErrNotSource); err != nil {
		return flushResult{}, err
	}
	ctr, err := m.findContainer(ctx, c.m.Namespace, c.m.Service)
	if err != nil {
		return flushResult{}, err
	}
	if ctr.ID == "" || !ctr.Running {
		return flushResult{}, fmt.Errorf("%w: %s/%s", ErrNoContainer, c.m.Namespace, c.m.Service)
	}
	began := time.Now()
	code, err := m.d.Containers.Exec(ctx, ctr.ID, c.sv.Spec.Flush)
	if err != nil {
		return flushResult{}, fmt.Errorf("running flush %v in %s/%s: %w", c.sv.Spec.Flush, c.m.Namespace, c.m.Service, err)
	}
	return flushResult{ExitCode: code, Took: time.Since(began)}, nil
}

// handleStopSource (source): stop the container; writes stop here. An
// executor of this version stops through the cutover call; this one
// serves older executors during an upgrade.
func (m *Migrator) handleStopSource(ctx context.Context, c migrationCall) (stopResult, error) {
	if err := m.requireRunning(c.m, c.m.SourceID, ErrNotSource); err != nil {
		return stopResult{}, err
	}
	return m.stopSource(ctx, c)
}

// stopSource stops the service's container and keeps it.
func (m *Migrator) stopSource(ctx context.Context, c migrationCall) (stopResult, error) {
	st, wait, err := m.haltSource(ctx, c)
	if err != nil {
		return stopResult{}, err
	}
	return st, wait()
}

// haltSource stops the service's container (kept) and returns as soon as
// its processes are gone: the writes have stopped. wait returns once the
// engine's stop is over; the caller must call it.
func (m *Migrator) haltSource(ctx context.Context, c migrationCall) (stopResult, func() error, error) {
	ctr, err := m.findContainer(ctx, c.m.Namespace, c.m.Service)
	if err != nil {
		return stopResult{}, nil, fmt.Errorf("finding the container of %s/%s: %w", c.m.Namespace, c.m.Service, err)
	}
	if ctr.ID == "" {
		return stopResult{}, nil, fmt.Errorf("%w: %s/%s", ErrNoContainer, c.m.Namespace, c.m.Service)
	}
	grace := runtime.StopGrace(c.sv.Spec)
	st, wait, err := m.d.Containers.Halt(ctx, ctr.ID, grace)
	if err != nil {
		return stopResult{}, nil, err
	}
	if st.Killed {
		m.cfg.Logger.Warn("the source container did not stop on its signal within its grace period and was killed",
			"migration", c.m.ID, "service", c.m.Namespace+"/"+c.m.Service, "grace", grace)
	}
	m.cfg.Crash.Hit("source", "source-stopped")
	return stopResult{Killed: st.Killed, Grace: grace}, wait, nil
}

// undoSource starts the source's stopped container again, if this machine
// still runs the service (it always does before a commit).
func (m *Migrator) undoSource(ctx context.Context, c migrationCall) error {
	if c.sv.MachineID != m.cfg.Self {
		return nil
	}
	// A stop the cutover left to the engine ends first: the container
	// must read as stopped before it is started again.
	m.mu.Lock()
	stopped := m.stopping[c.m.ID]
	delete(m.stopping, c.m.ID)
	m.mu.Unlock()
	if stopped != nil {
		select {
		case <-stopped:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	ctr, err := m.findContainer(ctx, c.m.Namespace, c.m.Service)
	if err != nil {
		return err
	}
	if ctr.ID != "" && !ctr.Running {
		if err := m.d.Containers.Restart(ctx, ctr.ID); err != nil {
			return err
		}
	}
	m.dropSnapshots(c)
	return nil
}

// dropSnapshots destroys, on the source of an aborted migration, the
// snapshots it took: kept, they would hold the blocks the service
// rewrites until a later move succeeds, and every read of the volume
// lists them. The namespace lock is still held, so no other move has
// picked one as its base. A failure leaves them to the next move's
// prune: the service runs again either way.
func (m *Migrator) dropSnapshots(c migrationCall) {
	if !m.holdsVolumes() {
		return
	}
	for _, v := range c.m.Volumes {
		if !m.d.Datasets.Exists(m.d.Datasets.Dataset(c.m.Namespace, v.Name)) {
			continue
		}
		if err := m.d.Copies.DestroySnapshotsOf(c.m.Namespace, v.Name, snapshotsOf(c.m.ID)); err != nil {
			m.log.Warn("destroying an aborted migration's snapshots; the next move's prune will", "migration", c.m.ID, "volume", v.Name, "err", err)
		}
	}
}

// handleCleanupSource (source, after the commit): remove the container and
// the service IP, keep the dataset with only the final snapshot, the base
// of a rollback.
func (m *Migrator) handleCleanupSource(ctx context.Context, c migrationCall) error {
	if !c.m.Phase.Committed() || m.cfg.Self != c.m.SourceID {
		return fmt.Errorf("migration %s is %s: no source cleanup here: %w", c.m.ID, c.m.Phase, ErrNotCommitted)
	}
	m.cfg.Crash.Hit("source", "committed")
	m.mu.Lock()
	delete(m.stopping, c.m.ID)
	m.mu.Unlock()
	if err := m.removeContainer(ctx, c); err != nil {
		return err
	}
	m.cfg.Crash.Hit("source", "cleanup")
	return m.pruneSnapshots(c)
}

// handlePurgeSource (source of a done migration): destroy the copy it
// kept.
func (m *Migrator) handlePurgeSource(_ context.Context, c migrationCall) error {
	if c.m.SourceID != m.cfg.Self {
		return fmt.Errorf("%w of migration %s", ErrNotSource, c.m.ID)
	}
	return m.purgeLocal(c)
}

// purgeLocal destroys the copy this machine kept as a done migration's
// source. A copy that is live again (a rollback made this machine the
// owner) or that is no longer this migration's is left alone.
func (m *Migrator) purgeLocal(c migrationCall) error {
	if c.m.Phase != fsm.PhaseDone {
		return fmt.Errorf("migration %s is %s: only a done migration kept a copy: %w", c.m.ID, c.m.Phase, ErrNotDone)
	}
	if !m.holdsVolumes() {
		return nil
	}
	for _, v := range c.m.Volumes {
		if m.ownsVolume(c.m.Namespace, v.Name) {
			continue
		}
		info, err := m.d.Copies.Get(c.m.Namespace, v.Name)
		if err != nil {
			continue // gone already
		}
		ours := false
		for _, s := range info.Snapshots {
			ours = ours || s.Name == finalSnapshot(c.m.ID)
		}
		if !ours {
			continue
		}
		if err := m.d.Datasets.DestroyDataset(info.Dataset); err != nil {
			return err
		}
		m.log.Info("destroyed the source copy a migration kept", "migration", c.m.ID, "dataset", info.Dataset)
	}
	return nil
}

// handleSendImage (source, asked by the executor when the target cannot
// pull the image): stream the service's image from this machine's engine
// into the target's, with a progress line every half second.
func (m *Migrator) handleSendImage(ctx context.Context, from string, req migrationRef, emit func(imageProgress)) (imageSent, error) {
	c, err := m.lookup(ctx, req.ID)
	if err != nil {
		return imageSent{}, err
	}
	if err := m.requireRunning(c.m, c.m.SourceID, ErrNotSource); err != nil {
		return imageSent{}, err
	}
	if from == "" {
		return imageSent{}, fmt.Errorf("image send asked by a caller that is no member: %w", ErrStreamRefused)
	}
	image := c.sv.Spec.RunImage()
	saved, err := m.d.Images.SaveImage(ctx, image)
	if err != nil {
		return imageSent{}, err
	}
	defer saved.Close()
	sent := &iocount.Reader{R: saved}
	done := make(chan error, 1)
	go func() {
		_, err := routeLoadImage.Call(ctx, m.d.Peers, c.m.TargetID, req, sent)
		done <- err
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				return imageSent{}, fmt.Errorf("streaming image %s to the target: %w", image, err)
			}
			return imageSent{Bytes: sent.N()}, nil
		case <-tick.C:
			emit(imageProgress{Bytes: sent.N()})
		}
	}
}
