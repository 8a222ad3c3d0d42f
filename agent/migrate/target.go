package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
)

// The target's side of a migration: it receives streams into staging
// copies, puts them in place and starts the service on them, and undoes
// all of it when the migration aborts, never touching what it owns.

// handleReceive (target): accept a stream only from the migration's
// source, into a staging dataset, never over a volume this machine owns.
// The first stream with a base turns the copy this machine kept from an
// earlier migration into the staging dataset, so only the difference
// travels.
func (m *Migrator) handleReceive(ctx context.Context, _ string, req streamRequest, body peer.Body) (receiveResult, error) {
	c, err := m.lookup(ctx, req.ID)
	if err != nil {
		return receiveResult{}, err
	}
	// Named now that the facts have caught up: a target that just
	// restarted may not know the machines yet when the stream comes in.
	from := peer.From(ctx)
	f := c.m
	if err := m.requireRunning(f, f.TargetID, ErrNotTarget); err != nil {
		return receiveResult{}, err
	}
	if from == "" || from != f.SourceID {
		return receiveResult{}, fmt.Errorf("stream from %s refused: %w (migration %s)", m.nameOf(from), ErrStreamRefused, f.ID)
	}
	if err := m.requireVolumes(); err != nil {
		return receiveResult{}, err
	}
	point := "warm-copy"
	if req.Snap == finalSnapshot(f.ID) {
		// The source has stopped; nothing of the final increment came yet.
		m.cfg.Crash.Hit("target", "source-stopped")
		point = "final-send"
	}
	if m.ownsVolume(f.Namespace, req.Volume) {
		return receiveResult{}, fmt.Errorf("volume %s/%s: %w: refusing to receive over it", f.Namespace, req.Volume, ErrVolumeOwned)
	}
	ds := m.d.Datasets
	staging := ds.StagingDataset(f.ID, req.Volume)
	dest := staging
	if m.placed(f, req.Volume) {
		// The target was prepared: the last increment lands where the
		// volume is mounted, and nothing is renamed or mounted at cutover.
		dest = ds.Dataset(f.Namespace, req.Volume)
	} else if req.Base != "" && !ds.Exists(staging) {
		kept := ds.Dataset(f.Namespace, req.Volume)
		if !ds.Exists(kept) {
			return receiveResult{}, fmt.Errorf("incremental from %s asked for %s/%s: %w", req.Base, f.Namespace, req.Volume, ErrNoCopy)
		}
		m.log.Info("receiving into the copy kept from an earlier migration", "migration", f.ID, "dataset", kept, "base", req.Base)
		if err := ds.MoveDataset(kept, staging); err != nil {
			return receiveResult{}, err
		}
		// Snapshots after the base (an aborted move's, if this machine
		// has not undone it yet) would refuse the increment.
		if err := ds.RollbackTo(staging, req.Base); err != nil {
			return receiveResult{}, err
		}
	}
	r := &deadlineReader{body: body, idle: m.cfg.StallTimeout, first: func() { m.cfg.Crash.Hit("target", point) }}
	if err := m.d.Streams.ReceiveInto(dest, req.Base != "", r); err != nil {
		if r.stalled != nil {
			return receiveResult{}, fmt.Errorf("%w (%v)", r.stalled, err)
		}
		return receiveResult{}, err
	}
	guid, err := m.d.Streams.SnapshotGUID(dest, req.Snap)
	return receiveResult{TargetGUID: guid}, err
}

// placed tells whether a volume's copy of this migration is in its place
// already (the target was prepared): no staging copy left, and the
// dataset in place is marked as this migration's.
func (m *Migrator) placed(f fsm.Migration, vol string) bool {
	m.mu.Lock()
	known := m.inPlace[f.ID+"/"+vol]
	m.mu.Unlock()
	if known {
		return true
	}
	ds := m.d.Datasets
	return !ds.Exists(ds.StagingDataset(f.ID, vol)) && ds.Exists(ds.Dataset(f.Namespace, vol)) &&
		m.d.Copies.Origin(f.Namespace, vol) == f.ID
}

// deadlineReader reads a stream, pushing its read deadline forward on
// every read: a stream that stops for the stall timeout (a cut link)
// fails instead of hanging a `zfs receive`.
type deadlineReader struct {
	body  peer.Body
	idle  time.Duration
	first func()
	once  sync.Once
	// stalled is the stall that ended the stream, if one did: the
	// receiving command reports only that its input broke off.
	stalled error
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	d.body.SetReadDeadline(time.Now().Add(d.idle))
	k, err := d.body.Read(p)
	if k > 0 && d.first != nil {
		d.once.Do(d.first)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("%w: no byte for %s: %v", ErrStalled, d.idle, err)
		d.stalled = err
	}
	return k, err
}

var _ io.Reader = (*deadlineReader)(nil)

// handlePrepareTarget (target, after the warm copy, before the source
// stops): put the received copies in place and create the container
// without starting it, so the cutover only receives the last increment
// where the volume is mounted and starts the container. Safe to repeat.
func (m *Migrator) handlePrepareTarget(ctx context.Context, c migrationCall) (preparedTarget, error) {
	if err := m.requireRunning(c.m, c.m.TargetID, ErrNotTarget); err != nil {
		return preparedTarget{}, err
	}
	began := time.Now()
	rs, err := m.placeCopies(c)
	if err != nil {
		return preparedTarget{}, err
	}
	adopted := time.Now()
	// A container left by an earlier attempt of this migration is made
	// again from the spec: this machine does not run the service.
	if old, err := m.findContainer(ctx, c.m.Namespace, c.m.Service); err != nil {
		return preparedTarget{}, err
	} else if old.ID != "" {
		if err := m.d.Containers.Remove(ctx, old.ID, 0); err != nil {
			return preparedTarget{}, err
		}
	}
	// Its ports are published on the service IP, which the host allows
	// before it holds the address: clients here reach the owner until the
	// commit, and an abort throws away a copy nobody used. Held, it runs
	// drover-hold, which touches nothing until the cutover releases it.
	res := preparedTarget{Adopt: adopted.Sub(began)}
	if h := m.d.Holder; h != nil && h.CanHold() {
		_, err := h.CreateHeld(ctx, rs)
		if err == nil {
			res.Create, res.Held = time.Since(adopted), true
			return res, nil
		}
		m.log.Warn("could not hold the container: it starts at the cutover", "migration", c.m.ID, "err", err)
	}
	if _, err := m.d.Starter.Create(ctx, rs); err != nil {
		return preparedTarget{}, err
	}
	res.Create = time.Since(adopted)
	return res, nil
}

// handleStartTarget (target): start the container prepared before the
// cutover and wait until it is ready. A target that was not prepared (an
// executor of an older version) puts the copies in place and creates the
// container first. Each adopted dataset is marked with the migration's
// id, so an abort destroys exactly it.
func (m *Migrator) handleStartTarget(ctx context.Context, c migrationCall) (startResult, error) {
	f, sv := c.m, c.sv
	if err := m.requireRunning(f, f.TargetID, ErrNotTarget); err != nil {
		return startResult{}, err
	}
	var res startResult
	rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP}
	ctr, err := m.findContainer(ctx, f.Namespace, f.Service)
	if err != nil {
		return startResult{}, err
	}
	began := time.Now()
	if ctr.ID == "" {
		if rs, err = m.placeCopies(c); err != nil {
			return startResult{}, err
		}
		res.Adopt = time.Since(began)
		if ctr, err = m.d.Starter.Create(ctx, rs); err != nil {
			return startResult{}, err
		}
	}
	startAt := time.Now()
	switch {
	case ctr.Held && ctr.Running && m.d.Holder != nil:
		if err := m.d.Holder.Release(ctx, ctr); err != nil {
			return startResult{}, err
		}
		res.Released = true
	case !ctr.Running:
		if err := m.d.Containers.Restart(ctx, ctr.ID); err != nil {
			return startResult{}, err
		}
	}
	started := time.Now()
	if err := m.d.Starter.WaitReady(ctx, ctr, rs); err != nil {
		return startResult{}, err
	}
	res.ReadyAt = time.Now()
	res.Start, res.Ready = started.Sub(startAt), res.ReadyAt.Sub(started)
	m.log.Info("started on the target", "migration", f.ID, "volumes_adopted", res.Adopt.Round(time.Millisecond),
		"container_started", res.Start.Round(time.Millisecond), "ready", res.Ready.Round(time.Millisecond))
	m.cfg.Crash.Hit("target", "target-started")
	return res, nil
}

// placeCopies puts every volume's copy of the migration in place and
// gives the run spec that mounts them.
func (m *Migrator) placeCopies(c migrationCall) (runtime.RunSpec, error) {
	f, sv := c.m, c.sv
	rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP, Mounts: map[string]string{}}
	if len(f.Volumes) > 0 {
		if err := m.requireVolumes(); err != nil {
			return runtime.RunSpec{}, err
		}
	}
	for _, v := range f.Volumes {
		mountpoint, err := m.placeCopy(f.ID, f.Namespace, v.Name)
		if err != nil {
			return runtime.RunSpec{}, fmt.Errorf("placing the copy of %s/%s: %w", f.Namespace, v.Name, err)
		}
		rs.Mounts[v.Name] = mountpoint
		m.mu.Lock()
		m.inPlace[f.ID+"/"+v.Name] = true
		m.mu.Unlock()
	}
	// A received dataset has the properties of where it landed: the
	// spec's apply to what the service writes here.
	for _, vm := range sv.Spec.Volumes {
		if err := m.d.Copies.SetProperties(f.Namespace, vm.Name, volume.Properties{Quota: vm.QuotaBytes, RecordSize: vm.RecordSize, Compression: vm.Compression}); err != nil {
			return runtime.RunSpec{}, err
		}
	}
	return rs, nil
}

// placeCopy puts the staging copy of one volume in its place, marks it
// as this migration's and gives its mountpoint. Safe to repeat: a copy in
// place already is only marked again.
func (m *Migrator) placeCopy(id, ns, vol string) (string, error) {
	ds, cp := m.d.Datasets, m.d.Copies
	staging, final := ds.StagingDataset(id, vol), ds.Dataset(ns, vol)
	if ds.Exists(final) && ds.Exists(staging) {
		// A copy kept from an older migration that shares no snapshot with
		// the source: the fresh copy supersedes it.
		m.log.Warn("replacing a stale copy with the one just received", "migration", id, "dataset", final)
		if err := ds.DestroyDataset(final); err != nil {
			return "", err
		}
	}
	if ds.Exists(staging) {
		if _, err := cp.Adopt(staging, ns, vol); err != nil {
			return "", err
		}
	}
	if err := cp.SetOrigin(ns, vol, id); err != nil {
		return "", err
	}
	info, err := cp.Get(ns, vol)
	if err != nil {
		return "", err
	}
	return info.Mountpoint, nil
}

// forgetInPlace forgets which copies of a migration are in place: it is
// over on this machine.
func (m *Migrator) forgetInPlace(f fsm.Migration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range f.Volumes {
		delete(m.inPlace, f.ID+"/"+v.Name)
	}
}

// undoTarget removes what a migration that did not commit left on its
// target: the container and service IP of a service this machine does not
// run, the staging copies, and the datasets it adopted. A copy kept from
// an earlier migration that served as the base goes back to its place.
// Safe to repeat, and safe on old migrations: nothing this machine owns is
// touched.
func (m *Migrator) undoTarget(ctx context.Context, c migrationCall) error {
	m.forgetInPlace(c.m)
	if err := m.removeContainer(ctx, c); err != nil {
		return err
	}
	if !m.holdsVolumes() {
		return nil
	}
	var errs []error
	for _, v := range c.m.Volumes {
		if m.ownsVolume(c.m.Namespace, v.Name) {
			continue
		}
		errs = append(errs, m.undoCopy(c.m.ID, c.m.Namespace, v.Name, v.Base != ""))
	}
	return errors.Join(errs...)
}

// undoCopy removes what one volume's migration left here: the staging
// copy is destroyed, or, when it was made from a copy kept from before
// (hadBase) that is not back in place, renamed back; a dataset this
// migration adopted from scratch is destroyed; a copy that stays loses
// the snapshots this migration brought.
func (m *Migrator) undoCopy(id, ns, vol string, hadBase bool) error {
	ds := m.d.Datasets
	staging, final := ds.StagingDataset(id, vol), ds.Dataset(ns, vol)
	var errs []error
	if ds.Exists(staging) {
		if hadBase && !ds.Exists(final) {
			errs = append(errs, ds.MoveDataset(staging, final))
		} else {
			errs = append(errs, ds.DestroyDataset(staging))
		}
	}
	if !hadBase && m.d.Copies.Origin(ns, vol) == id {
		errs = append(errs, ds.DestroyDataset(final))
	} else if ds.Exists(final) {
		errs = append(errs, m.d.Copies.DestroySnapshotsOf(ns, vol, snapshotsOf(id)))
	}
	return errors.Join(errs...)
}

// handleCleanupTarget (target, after the commit): keep only the final
// snapshot.
func (m *Migrator) handleCleanupTarget(_ context.Context, c migrationCall) error {
	if !c.m.Phase.Committed() || m.cfg.Self != c.m.TargetID {
		return fmt.Errorf("migration %s is %s: no target cleanup here: %w", c.m.ID, c.m.Phase, ErrNotCommitted)
	}
	m.cfg.Crash.Hit("target", "committed")
	m.forgetInPlace(c.m)
	// Committed: this machine owns the service IP now, on its own host too.
	if err := m.d.Loopback.Add(c.sv.ServiceIP); err != nil {
		return err
	}
	err := m.pruneSnapshots(c)
	m.cfg.Crash.Hit("target", "cleanup")
	return err
}

// handlePrepareImage (target, before the source stops): have the
// service's image, pulling it from its registry when missing; when it
// cannot be pulled, say why, and the source streams it.
func (m *Migrator) handlePrepareImage(ctx context.Context, _ string, req migrationRef, emit func(runtime.PullProgress)) (prepareResult, error) {
	c, err := m.lookup(ctx, req.ID)
	if err != nil {
		return prepareResult{}, err
	}
	if err := m.requireRunning(c.m, c.m.TargetID, ErrNotTarget); err != nil {
		return prepareResult{}, err
	}
	image := c.sv.Spec.RunImage()
	if has, err := m.d.Starter.HasImage(ctx, image); err != nil || has {
		return prepareResult{}, err
	}
	if err := m.d.Images.CanPull(ctx, image); err != nil {
		return prepareResult{Missing: err.Error()}, nil
	}
	began := time.Now()
	if err := m.d.Images.EnsureImage(ctx, image, runtime.ThrottleProgress(emit)); err != nil {
		return prepareResult{}, err
	}
	m.cfg.Logger.Info("pulled the image of a migrating service", "migration", c.m.ID, "image", image, "took", time.Since(began))
	return prepareResult{Pulled: true, Took: time.Since(began)}, nil
}

// handleLoadImage (target): load the service's image as the migration's
// source streams it; from nobody else.
func (m *Migrator) handleLoadImage(ctx context.Context, _ string, req migrationRef, body peer.Body) (done, error) {
	c, err := m.lookup(ctx, req.ID)
	if err != nil {
		return done{}, err
	}
	if err := m.requireRunning(c.m, c.m.TargetID, ErrNotTarget); err != nil {
		return done{}, err
	}
	if from := peer.From(ctx); from == "" || from != c.m.SourceID {
		return done{}, fmt.Errorf("image stream from %s refused: %w (migration %s)", m.nameOf(from), ErrStreamRefused, c.m.ID)
	}
	image := c.sv.Spec.RunImage()
	if err := m.d.Images.LoadImage(ctx, image, &deadlineReader{body: body, idle: m.cfg.StallTimeout}); err != nil {
		return done{}, err
	}
	m.cfg.Logger.Info("loaded the image of a migrating service from its source", "migration", c.m.ID, "image", image)
	return done{}, nil
}
