package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
)

// Daemon-to-daemon calls of a migration. The executor (the daemon where
// `migrate apply` ran) drives them; source and target check every call
// against the migration's facts.
const (
	rpcSend          = "migrate/send"           // source: snapshot and stream a volume to the target
	rpcReceive       = "migrate/receive"        // target: receive a stream from the source
	rpcStopSource    = "migrate/stop-source"    // source: stop the service's container (kept)
	rpcStartTarget   = "migrate/start-target"   // target: adopt the copies, start, wait ready
	rpcAbort         = "migrate/abort"          // both: undo before the commit
	rpcCleanupSource = "migrate/cleanup-source" // source, after the commit: container away, copy kept
	rpcCleanupTarget = "migrate/cleanup-target" // target, after the commit: keep only the final snapshot
	rpcPurgeSource   = "migrate/purge-source"   // source of a done migration: destroy the kept copy
)

// sendLine is one line of the source's answer to rpcSend: progress while
// the stream flows, then the outcome.
type sendLine struct {
	Bytes      uint64 `json:"bytes"`
	Done       bool   `json:"done,omitempty"`
	SourceGUID uint64 `json:"source_guid,omitempty"`
	TargetGUID uint64 `json:"target_guid,omitempty"`
	Error      string `json:"error,omitempty"`
}

// receiveResult is the target's answer to rpcReceive.
type receiveResult struct {
	TargetGUID uint64 `json:"target_guid"`
}

// errStalled: a volume stream moved no byte for the stall timeout.
var errStalled = errors.New("volume stream stalled")

func (a *Agent) registerMigrationRPC(n *cluster.Node) {
	n.HandleRPC("POST "+rpcSend, a.handleSend)
	n.HandleRPC("POST "+rpcReceive, a.handleReceive)
	n.HandleRPC("POST "+rpcStopSource, a.rpcHandler(a.handleStopSource))
	n.HandleRPC("POST "+rpcStartTarget, a.rpcHandler(a.handleStartTarget))
	n.HandleRPC("POST "+rpcAbort, a.rpcHandler(a.handleAbort))
	n.HandleRPC("POST "+rpcCleanupSource, a.rpcHandler(a.handleCleanupSource))
	n.HandleRPC("POST "+rpcCleanupTarget, a.rpcHandler(a.handleCleanupTarget))
	n.HandleRPC("POST "+rpcPurgeSource, a.rpcHandler(a.handlePurgeSource))
	n.HandleRPC("GET "+rpcLocalFacts, a.handleLocalFacts)
	n.HandleRPC("POST "+rpcLeave, a.handleLeave)
}

// migrationCall is what every migration handler starts from.
type migrationCall struct {
	m  fsm.Migration
	sv fsm.Service
	w  *workloads
}

// lookupMigration finds the migration a call names, its service and this
// machine's workloads.
func (a *Agent) lookupMigration(r *http.Request) (migrationCall, error) {
	n, wl := a.currentNode(), a.currentWork()
	if n == nil || wl == nil {
		return migrationCall{}, errNotInCluster
	}
	// The executor acts on facts it just wrote; wait until this machine
	// has them too (a daemon that just started may need a moment), so the
	// checks below see the phase it asks about.
	id := r.URL.Query().Get("id")
	var c migrationCall
	var ok bool
	deadline := time.Now().Add(10 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		caughtUp := n.CaughtUp(cctx)
		cancel()
		n.Read(func(s *fsm.State) {
			if c.m, ok = s.Migration(id); ok {
				c.sv, _ = s.Service(c.m.Namespace, c.m.Service)
			}
		})
		if (ok && caughtUp == nil) || time.Now().After(deadline) || r.Context().Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !ok {
		return migrationCall{}, fmt.Errorf("no migration %q", id)
	}
	c.w = wl
	return c, nil
}

// rpcHandler wraps a migration handler: errors become a 409 with the
// reason, results JSON.
func (a *Agent) rpcHandler(h func(*http.Request, migrationCall) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		res, err := func() (any, error) {
			c, err := a.lookupMigration(r)
			if err != nil {
				return nil, err
			}
			return h(r, c)
		}()
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(res)
	}
}

func (a *Agent) currentWork() *workloads {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.work
}

// requireRole checks that a migration still runs before its commit and
// that this machine plays role in it.
func (a *Agent) requireRole(m fsm.Migration, machineID, role string) error {
	if m.Phase.Terminal() || m.Phase.Committed() {
		return fmt.Errorf("migration %s is %s", m.ID, m.Phase)
	}
	if machineID != a.machineID {
		return fmt.Errorf("this machine is not the %s of migration %s", role, m.ID)
	}
	return nil
}

func (a *Agent) requireVolumes(w *workloads) error {
	if w.vols == nil {
		return errors.New("this machine holds no volumes (no --zfs-parent)")
	}
	return nil
}

// finalSnapshot is the name of a migration's last snapshot: taken after
// the source stopped, kept on both sides as the base of a rollback.
func finalSnapshot(id string) string { return volume.SnapshotPrefix + id + "-final" }

// handleSend (source): snapshot a volume and stream it to the target,
// answering with a progress line every half second and the outcome last.
// A stream that moves no byte for the stall timeout is cancelled.
func (a *Agent) handleSend(w http.ResponseWriter, r *http.Request) {
	c, err := a.lookupMigration(r)
	if err == nil {
		err = a.requireRole(c.m, c.m.SourceID, "source")
	}
	if err == nil {
		err = a.requireVolumes(c.w)
	}
	q := r.URL.Query()
	vol, snap, base := q.Get("volume"), q.Get("snap"), q.Get("base")
	var s volume.Snapshot
	if err == nil {
		s, err = c.w.vols.Snapshot(c.m.Namespace, vol, snap)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	point := "warm-copy"
	if snap == finalSnapshot(c.m.ID) {
		point = "final-send"
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush() // the executor's idle timer runs from here
	enc := json.NewEncoder(w)

	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(nil)
	pr, pw := io.Pipe()
	var sent atomic.Uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		cw := &countingWriter{w: pw, n: &sent, first: func() { a.crashPoint("source", point) }}
		pw.CloseWithError(c.w.vols.Send(c.m.Namespace, vol, snap, base, cw))
	}()
	type outcome struct {
		guid uint64
		err  error
	}
	done := make(chan outcome, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		q := url.Values{"id": {c.m.ID}, "volume": {vol}, "snap": {snap}, "base": {base}}
		resp, err := a.currentNode().CallRPC(ctx, c.m.TargetID, http.MethodPost, rpcReceive+"?"+q.Encode(), pr)
		pr.CloseWithError(errors.New("the target's answer came"))
		if err != nil {
			done <- outcome{err: err}
			return
		}
		defer resp.Body.Close()
		var got receiveResult
		if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
			done <- outcome{err: fmt.Errorf("reading the target's answer: %w", err)}
			return
		}
		done <- outcome{guid: got.TargetGUID}
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	last, lastMoved := uint64(0), time.Now()
	var res outcome
wait:
	for {
		select {
		case res = <-done:
			break wait
		case <-tick.C:
			n := sent.Load()
			if n != last {
				last, lastMoved = n, time.Now()
			} else if time.Since(lastMoved) > a.cfg.StallTimeout {
				cancel(fmt.Errorf("%w: no byte for %s", errStalled, a.cfg.StallTimeout))
			}
			enc.Encode(sendLine{Bytes: n})
			rc.Flush()
		}
	}
	cancel(nil)
	wg.Wait()
	line := sendLine{Bytes: sent.Load(), Done: true, SourceGUID: s.GUID, TargetGUID: res.guid}
	if res.err != nil {
		err := res.err
		if cause := context.Cause(ctx); cause != nil && errors.Is(cause, errStalled) {
			err = cause
		}
		line.Error = fmt.Sprintf("streaming %s/%s@%s to the target: %v", c.m.Namespace, vol, snap, err)
	}
	enc.Encode(line)
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

// deadlineReader reads a request body, pushing the connection's read
// deadline forward on every read: a stream that stops for the stall
// timeout (a cut link) fails instead of hanging a `zfs receive`.
type deadlineReader struct {
	r     io.Reader
	rc    *http.ResponseController
	idle  time.Duration
	first func()
	once  sync.Once
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	d.rc.SetReadDeadline(time.Now().Add(d.idle))
	k, err := d.r.Read(p)
	if k > 0 && d.first != nil {
		d.once.Do(d.first)
	}
	return k, err
}

// handleReceive (target): accept a stream only from the migration's
// source, into a staging dataset, never over a volume this machine owns.
// The first stream with a base turns the copy this machine kept from an
// earlier migration into the staging dataset, so only the difference
// travels.
func (a *Agent) handleReceive(w http.ResponseWriter, r *http.Request) {
	guid, err := a.receive(w, r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(receiveResult{TargetGUID: guid})
}

func (a *Agent) receive(w http.ResponseWriter, r *http.Request) (uint64, error) {
	c, err := a.lookupMigration(r)
	if err != nil {
		return 0, err
	}
	m := c.m
	if err := a.requireRole(m, m.TargetID, "target"); err != nil {
		return 0, err
	}
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	ip, _ := netip.ParseAddr(host)
	if caller, ok := a.currentNode().MachineByAddr(ip.Unmap()); !ok || caller != m.SourceID {
		return 0, fmt.Errorf("stream from %s refused: only the source of migration %s may send", host, m.ID)
	}
	if err := a.requireVolumes(c.w); err != nil {
		return 0, err
	}
	q := r.URL.Query()
	vol, snap, base := q.Get("volume"), q.Get("snap"), q.Get("base")
	point := "warm-copy"
	if snap == finalSnapshot(m.ID) {
		// The source has stopped; nothing of the final increment came yet.
		a.crashPoint("target", "source-stopped")
		point = "final-send"
	}
	if a.ownsVolume(m.Namespace, vol) {
		return 0, fmt.Errorf("volume %s/%s is owned by this machine: refusing to receive over it", m.Namespace, vol)
	}
	staging := c.w.vols.StagingDataset(m.ID, vol)
	if base != "" && !c.w.vols.Exists(staging) {
		kept := c.w.vols.Dataset(m.Namespace, vol)
		if !c.w.vols.Exists(kept) {
			return 0, fmt.Errorf("incremental from %s asked, but this machine has no copy of %s/%s", base, m.Namespace, vol)
		}
		a.logger.Info("receiving into the copy kept from an earlier migration", "migration", m.ID, "dataset", kept, "base", base)
		if err := c.w.vols.MoveDataset(kept, staging); err != nil {
			return 0, err
		}
	}
	body := &deadlineReader{r: r.Body, rc: http.NewResponseController(w), idle: a.cfg.StallTimeout,
		first: func() { a.crashPoint("target", point) }}
	if err := c.w.vols.ReceiveInto(staging, base != "", body); err != nil {
		return 0, err
	}
	return c.w.vols.SnapshotGUID(staging, snap)
}

// ownsVolume tells whether the facts make this machine a volume's owner.
func (a *Agent) ownsVolume(ns, vol string) bool {
	var owner string
	a.currentNode().Read(func(s *fsm.State) {
		if v, ok := s.Volume(ns, vol); ok {
			owner = v.OwnerID
		}
	})
	return owner == a.machineID
}

// findContainer is the service's container on this machine, if any.
func findContainer(ctx context.Context, w *workloads, ns, svc string) (runtime.Container, error) {
	cs, err := w.rt.List(ctx)
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

// handleStopSource (source): stop the container; writes stop here.
func (a *Agent) handleStopSource(r *http.Request, c migrationCall) (any, error) {
	m := c.m
	if err := a.requireRole(m, m.SourceID, "source"); err != nil {
		return nil, err
	}
	ctr, err := findContainer(r.Context(), c.w, m.Namespace, m.Service)
	if err != nil || ctr.ID == "" {
		return nil, fmt.Errorf("no container of %s/%s here: %v", m.Namespace, m.Service, err)
	}
	if err := c.w.rt.Stop(r.Context(), ctr.ID, 10*time.Second); err != nil {
		return nil, err
	}
	a.crashPoint("source", "source-stopped")
	return struct{}{}, nil
}

// startResult is the target's answer to rpcStartTarget.
type startResult struct {
	ReadyAt time.Time `json:"ready_at"`
}

// handleStartTarget (target): put the received copies in place, start the
// container on them and wait until it is ready. Each adopted dataset is
// marked with the migration's id, so an abort destroys exactly it.
func (a *Agent) handleStartTarget(r *http.Request, c migrationCall) (any, error) {
	m, sv, w := c.m, c.sv, c.w
	if err := a.requireRole(m, m.TargetID, "target"); err != nil {
		return nil, err
	}
	began := time.Now()
	rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP, Mounts: map[string]string{}}
	if len(m.Volumes) > 0 {
		if err := a.requireVolumes(w); err != nil {
			return nil, err
		}
	}
	for _, v := range m.Volumes {
		staging := w.vols.StagingDataset(m.ID, v.Name)
		final := w.vols.Dataset(m.Namespace, v.Name)
		if w.vols.Exists(final) && w.vols.Exists(staging) {
			// A copy kept from an older migration that shares no snapshot
			// with the source: the fresh copy supersedes it.
			a.logger.Warn("replacing a stale copy with the one just received", "migration", m.ID, "dataset", final)
			if err := w.vols.DestroyDataset(final); err != nil {
				return nil, err
			}
		}
		if w.vols.Exists(staging) {
			if _, err := w.vols.Adopt(staging, m.Namespace, v.Name); err != nil {
				return nil, err
			}
		}
		if err := w.vols.SetOrigin(m.Namespace, v.Name, m.ID); err != nil {
			return nil, err
		}
		info, err := w.vols.Get(m.Namespace, v.Name)
		if err != nil {
			return nil, err
		}
		rs.Mounts[v.Name] = info.Mountpoint
	}
	adopted := time.Now()
	if err := w.addServiceIP(sv.ServiceIP); err != nil {
		return nil, err
	}
	ctr, err := w.rt.Start(r.Context(), rs)
	if err != nil {
		return nil, err
	}
	started := time.Now()
	if err := w.rt.WaitReady(r.Context(), ctr, rs); err != nil {
		return nil, err
	}
	ready := time.Now()
	a.logger.Info("started on the target", "migration", m.ID, "volumes_adopted", adopted.Sub(began).Round(time.Millisecond),
		"container_started", started.Sub(adopted).Round(time.Millisecond), "ready", ready.Sub(started).Round(time.Millisecond))
	a.crashPoint("target", "target-started")
	return startResult{ReadyAt: ready}, nil
}

// handleAbort (source or target): undo this machine's part before the
// commit.
func (a *Agent) handleAbort(r *http.Request, c migrationCall) (any, error) {
	if c.m.Phase.Committed() {
		return nil, fmt.Errorf("migration %s is committed: it only goes forward", c.m.ID)
	}
	switch a.machineID {
	case c.m.TargetID:
		return struct{}{}, a.undoTarget(r.Context(), c)
	case c.m.SourceID:
		return struct{}{}, a.undoSource(r.Context(), c)
	}
	return nil, fmt.Errorf("this machine takes no part in migration %s", c.m.ID)
}

// undoTarget removes what a migration that did not commit left on its
// target: the container and service IP of a service this machine does not
// run, the staging copies, and the datasets it adopted. A copy kept from
// an earlier migration that served as the base goes back to its place.
// Safe to repeat, and safe on old migrations: nothing this machine owns is
// touched.
func (a *Agent) undoTarget(ctx context.Context, c migrationCall) error {
	m, w := c.m, c.w
	if c.sv.MachineID != a.machineID {
		ctr, err := findContainer(ctx, w, m.Namespace, m.Service)
		if err != nil {
			return err
		}
		if ctr.ID != "" {
			if err := w.rt.Remove(ctx, ctr.ID, 10*time.Second); err != nil {
				return err
			}
		}
		if c.sv.ServiceIP.IsValid() {
			if err := w.removeServiceIP(c.sv.ServiceIP); err != nil {
				return err
			}
		}
	}
	if w.vols == nil {
		return nil
	}
	var errs []error
	for _, v := range m.Volumes {
		if a.ownsVolume(m.Namespace, v.Name) {
			continue
		}
		staging := w.vols.StagingDataset(m.ID, v.Name)
		final := w.vols.Dataset(m.Namespace, v.Name)
		if w.vols.Exists(staging) {
			if v.Base != "" && !w.vols.Exists(final) {
				errs = append(errs, w.vols.MoveDataset(staging, final))
			} else {
				errs = append(errs, w.vols.DestroyDataset(staging))
			}
		}
		if v.Base == "" && w.vols.Origin(m.Namespace, v.Name) == m.ID {
			errs = append(errs, w.vols.DestroyDataset(final))
		}
	}
	return errors.Join(errs...)
}

// undoSource starts the source's stopped container again, if this machine
// still runs the service (it always does before a commit).
func (a *Agent) undoSource(ctx context.Context, c migrationCall) error {
	if c.sv.MachineID != a.machineID {
		return nil
	}
	ctr, err := findContainer(ctx, c.w, c.m.Namespace, c.m.Service)
	if err != nil {
		return err
	}
	if ctr.ID != "" && !ctr.Running {
		return c.w.rt.Restart(ctx, ctr.ID)
	}
	return nil
}

// handleCleanupSource (source, after the commit): remove the container and
// the service IP, keep the dataset with only the final snapshot, the base
// of a rollback.
func (a *Agent) handleCleanupSource(r *http.Request, c migrationCall) (any, error) {
	m := c.m
	if !m.Phase.Committed() || a.machineID != m.SourceID {
		return nil, fmt.Errorf("migration %s is %s: no source cleanup here", m.ID, m.Phase)
	}
	a.crashPoint("source", "committed")
	if c.sv.MachineID != a.machineID {
		ctr, err := findContainer(r.Context(), c.w, m.Namespace, m.Service)
		if err != nil {
			return nil, err
		}
		if ctr.ID != "" {
			if err := c.w.rt.Remove(r.Context(), ctr.ID, 10*time.Second); err != nil {
				return nil, err
			}
		}
		if err := c.w.removeServiceIP(c.sv.ServiceIP); err != nil {
			return nil, err
		}
	}
	a.crashPoint("source", "cleanup")
	return struct{}{}, a.pruneMigrationSnapshots(c)
}

// handleCleanupTarget (target, after the commit): keep only the final
// snapshot.
func (a *Agent) handleCleanupTarget(_ *http.Request, c migrationCall) (any, error) {
	m := c.m
	if !m.Phase.Committed() || a.machineID != m.TargetID {
		return nil, fmt.Errorf("migration %s is %s: no target cleanup here", m.ID, m.Phase)
	}
	a.crashPoint("target", "committed")
	err := a.pruneMigrationSnapshots(c)
	a.crashPoint("target", "cleanup")
	return struct{}{}, err
}

func (a *Agent) pruneMigrationSnapshots(c migrationCall) error {
	if c.w.vols == nil {
		return nil
	}
	var errs []error
	for _, v := range c.m.Volumes {
		if c.w.vols.Exists(c.w.vols.Dataset(c.m.Namespace, v.Name)) {
			errs = append(errs, c.w.vols.PruneSnapshots(c.m.Namespace, v.Name, finalSnapshot(c.m.ID)))
		}
	}
	return errors.Join(errs...)
}

// handlePurgeSource (source of a done migration): destroy the copy it
// kept. A copy that is live again (a rollback made this machine the owner)
// or that is no longer this migration's is left alone.
func (a *Agent) handlePurgeSource(_ *http.Request, c migrationCall) (any, error) {
	if c.m.SourceID != a.machineID {
		return nil, fmt.Errorf("this machine is not the source of migration %s", c.m.ID)
	}
	return struct{}{}, a.purgeLocal(c)
}

func (a *Agent) purgeLocal(c migrationCall) error {
	m, w := c.m, c.w
	if m.Phase != fsm.PhaseDone {
		return fmt.Errorf("migration %s is %s: only a done migration kept a copy", m.ID, m.Phase)
	}
	if w.vols == nil {
		return nil
	}
	for _, v := range m.Volumes {
		if a.ownsVolume(m.Namespace, v.Name) {
			continue
		}
		info, err := w.vols.Get(m.Namespace, v.Name)
		if err != nil {
			continue // gone already
		}
		ours := false
		for _, s := range info.Snapshots {
			ours = ours || s.Name == finalSnapshot(m.ID)
		}
		if !ours {
			continue
		}
		if err := w.vols.DestroyDataset(info.Dataset); err != nil {
			return err
		}
		a.logger.Info("destroyed the source copy a migration kept", "migration", m.ID, "dataset", info.Dataset)
	}
	return nil
}
