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
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// Daemon-to-daemon calls of a migration. The executor (on the machine
// where `migrate apply` ran) drives them; source and target check every
// call against the migration's facts.
const (
	rpcSend        = "migrate/send"         // source: snapshot and stream a volume to the target
	rpcReceive     = "migrate/receive"      // target: receive a stream from the source
	rpcStopSource  = "migrate/stop-source"  // source: stop the service's container (kept)
	rpcStartTarget = "migrate/start-target" // target: adopt the copies, start, wait ready
	rpcAbort       = "migrate/abort"        // both: undo before the commit
)

// warmRounds bounds the incremental rounds while the service runs; a
// round that sends less than warmEnough ends the warm copy.
const (
	warmRounds = 4
	warmEnough = 8 << 20
)

type sendResult struct {
	Bytes      uint64 `json:"bytes"`
	SourceGUID uint64 `json:"source_guid"`
	TargetGUID uint64 `json:"target_guid"`
}

func (a *Agent) registerMigrationRPC(n *cluster.Node) {
	n.HandleRPC("POST "+rpcSend, a.rpcHandler(a.handleSend))
	n.HandleRPC("POST "+rpcReceive, a.rpcHandler(a.handleReceive))
	n.HandleRPC("POST "+rpcStopSource, a.rpcHandler(a.handleStopSource))
	n.HandleRPC("POST "+rpcStartTarget, a.rpcHandler(a.handleStartTarget))
	n.HandleRPC("POST "+rpcAbort, a.rpcHandler(a.handleAbort))
	n.HandleRPC("GET "+rpcLocalFacts, a.handleLocalFacts)
}

// rpcHandler wraps a migration handler: it finds the migration and this
// machine's workloads, and turns errors into a 409 with the reason.
func (a *Agent) rpcHandler(h func(*http.Request, fsm.Migration, fsm.Service, *workloads) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		res, err := func() (any, error) {
			n, wl := a.currentNode(), a.currentWork()
			if n == nil || wl == nil {
				return nil, errNotInCluster
			}
			id := r.URL.Query().Get("id")
			var m fsm.Migration
			var sv fsm.Service
			var ok bool
			n.Read(func(s *fsm.State) {
				if m, ok = s.Migration(id); ok {
					sv, _ = s.Service(m.Namespace, m.Service)
				}
			})
			if !ok {
				return nil, fmt.Errorf("no migration %q", id)
			}
			return h(r, m, sv, wl)
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

func (a *Agent) requireRole(m fsm.Migration, machineID, role string) error {
	if m.Phase.Terminal() || m.Phase.Committed() {
		return fmt.Errorf("migration %s is %s", m.ID, m.Phase)
	}
	if machineID != a.machineID {
		return fmt.Errorf("this machine is not the %s of migration %s", role, m.ID)
	}
	return nil
}

// handleSend (source): snapshot a volume and stream it to the target.
func (a *Agent) handleSend(r *http.Request, m fsm.Migration, _ fsm.Service, w *workloads) (any, error) {
	if err := a.requireRole(m, m.SourceID, "source"); err != nil {
		return nil, err
	}
	q := r.URL.Query()
	vol, snap, base := q.Get("volume"), q.Get("snap"), q.Get("base")
	if w.vols == nil {
		return nil, errors.New("this machine holds no volumes")
	}
	s, err := w.vols.Snapshot(m.Namespace, vol, snap)
	if err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	var sent atomic.Uint64
	go func() {
		pw.CloseWithError(w.vols.Send(m.Namespace, vol, snap, base, &countingWriter{w: pw, n: &sent}))
	}()
	path := fmt.Sprintf("%s?id=%s&volume=%s&snap=%s", rpcReceive, m.ID, vol, snap)
	resp, err := a.currentNode().CallRPC(r.Context(), m.TargetID, http.MethodPost, path, pr)
	pr.CloseWithError(errors.New("stream ended"))
	if err != nil {
		return nil, fmt.Errorf("streaming %s/%s@%s to the target: %w", m.Namespace, vol, snap, err)
	}
	defer resp.Body.Close()
	var got sendResult
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		return nil, fmt.Errorf("reading the target's answer: %w", err)
	}
	return sendResult{Bytes: sent.Load(), SourceGUID: s.GUID, TargetGUID: got.TargetGUID}, nil
}

type countingWriter struct {
	w io.Writer
	n *atomic.Uint64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	c.n.Add(uint64(k))
	return k, err
}

// handleReceive (target): accept a stream only from the migration's
// source, into a staging dataset, never over a volume this machine owns.
func (a *Agent) handleReceive(r *http.Request, m fsm.Migration, _ fsm.Service, w *workloads) (any, error) {
	if err := a.requireRole(m, m.TargetID, "target"); err != nil {
		return nil, err
	}
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	ip, _ := netip.ParseAddr(host)
	if caller, ok := a.currentNode().MachineByAddr(ip.Unmap()); !ok || caller != m.SourceID {
		return nil, fmt.Errorf("stream from %s refused: only the source of migration %s may send", host, m.ID)
	}
	vol, snap := r.URL.Query().Get("volume"), r.URL.Query().Get("snap")
	var owner string
	a.currentNode().Read(func(s *fsm.State) {
		if v, ok := s.Volume(m.Namespace, vol); ok {
			owner = v.OwnerID
		}
	})
	if owner == a.machineID {
		return nil, fmt.Errorf("volume %s/%s is owned by this machine: refusing to receive over it", m.Namespace, vol)
	}
	if w.vols == nil {
		return nil, errors.New("this machine holds no volumes (no --zfs-parent)")
	}
	staging := w.vols.StagingDataset(m.ID, vol)
	if err := w.vols.Receive(staging, r.Body); err != nil {
		return nil, err
	}
	guid, err := w.vols.SnapshotGUID(staging, snap)
	if err != nil {
		return nil, err
	}
	return sendResult{TargetGUID: guid}, nil
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
func (a *Agent) handleStopSource(r *http.Request, m fsm.Migration, _ fsm.Service, w *workloads) (any, error) {
	if err := a.requireRole(m, m.SourceID, "source"); err != nil {
		return nil, err
	}
	c, err := findContainer(r.Context(), w, m.Namespace, m.Service)
	if err != nil || c.ID == "" {
		return nil, fmt.Errorf("no container of %s/%s here: %v", m.Namespace, m.Service, err)
	}
	return struct{}{}, w.rt.Stop(r.Context(), c.ID, 10*time.Second)
}

// handleStartTarget (target): put the received copies in place, start the
// container on them and wait until it is ready.
func (a *Agent) handleStartTarget(r *http.Request, m fsm.Migration, sv fsm.Service, w *workloads) (any, error) {
	if err := a.requireRole(m, m.TargetID, "target"); err != nil {
		return nil, err
	}
	rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP, Mounts: map[string]string{}}
	if len(m.Volumes) > 0 && w.vols == nil {
		return nil, errors.New("this machine holds no volumes (no --zfs-parent)")
	}
	for _, v := range m.Volumes {
		info, err := w.vols.Adopt(w.vols.StagingDataset(m.ID, v.Name), m.Namespace, v.Name)
		if err != nil {
			return nil, err
		}
		rs.Mounts[v.Name] = info.Mountpoint
	}
	if err := w.addServiceIP(sv.ServiceIP); err != nil {
		return nil, err
	}
	c, err := w.rt.Start(r.Context(), rs)
	if err != nil {
		return nil, err
	}
	return struct{}{}, w.rt.WaitReady(r.Context(), c, rs)
}

// handleAbort (source or target): undo this machine's part before the
// commit. The target removes its container and every copy it received;
// the source starts its container again.
func (a *Agent) handleAbort(r *http.Request, m fsm.Migration, sv fsm.Service, w *workloads) (any, error) {
	if m.Phase.Committed() {
		return nil, fmt.Errorf("migration %s is committed: it only goes forward", m.ID)
	}
	ctx := r.Context()
	c, err := findContainer(ctx, w, m.Namespace, m.Service)
	if err != nil {
		return nil, err
	}
	switch a.machineID {
	case m.TargetID:
		if c.ID != "" {
			if err := w.rt.Remove(ctx, c.ID, 10*time.Second); err != nil {
				return nil, err
			}
		}
		if err := w.removeServiceIP(sv.ServiceIP); err != nil {
			return nil, err
		}
		for _, v := range m.Volumes {
			if err := w.vols.DestroyDataset(w.vols.StagingDataset(m.ID, v.Name)); err != nil {
				return nil, err
			}
			if err := w.vols.DestroyDataset(w.vols.Dataset(m.Namespace, v.Name)); err != nil {
				return nil, err
			}
		}
	case m.SourceID:
		if c.ID != "" && !c.Running {
			if err := w.rt.Restart(ctx, c.ID); err != nil {
				return nil, err
			}
		}
	default:
		return nil, fmt.Errorf("this machine takes no part in migration %s", m.ID)
	}
	return struct{}{}, nil
}

// Migrate moves a service and its volumes to another machine and returns
// when the move is done or undone.
func (a *Agent) Migrate(ctx context.Context, req ctlapi.MigrateRequest) (ctlapi.MigrationInfo, error) {
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
	ns, name := sv.Namespace, sv.Spec.Name
	id := "m" + randomSuffix() + randomSuffix()
	holder := a.cfg.Name + "/migrate/" + id
	if err := a.acquire(ctx, n, ns, holder); err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	lockCtx, stopRenew := context.WithCancel(ctx)
	renewDone := make(chan struct{})
	go func() { defer close(renewDone); a.renewLock(lockCtx, n, ns, holder) }()
	defer func() {
		stopRenew()
		<-renewDone
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		n.Apply(rctx, fsm.ReleaseLock{Namespace: ns, Holder: holder, At: time.Now()})
	}()
	if _, err := n.Apply(ctx, fsm.StartMigration{ID: id, Namespace: ns, Service: name, TargetID: target.ID, Holder: holder, At: time.Now()}); err != nil {
		return ctlapi.MigrationInfo{}, fmt.Errorf("starting migration: %w", err)
	}
	if err := a.runMigration(ctx, n, id, holder); err != nil {
		a.logger.Warn("migration failed before the commit: aborting", "id", id, "err", err)
		a.abortMigration(context.WithoutCancel(ctx), n, id, err)
		info, _ := a.migrationInfo(n, id)
		return info, &ctlapi.APIError{Status: http.StatusConflict, Code: "migration_aborted",
			Err: fmt.Errorf("migration %s of %s/%s aborted, the service runs on its source again: %w", id, ns, name, err)}
	}
	return a.migrationInfo(n, id)
}

// runMigration drives the phases up to the commit and the cleanup after.
func (a *Agent) runMigration(ctx context.Context, n *cluster.Node, id, holder string) error {
	m, _ := a.migrationFact(n, id)
	advance := func(phase fsm.MigrationPhase, vols []fsm.MigrationVolume) error {
		_, err := n.Apply(ctx, fsm.AdvanceMigration{ID: id, Phase: phase, Volumes: vols, At: time.Now()})
		return err
	}
	send := func(v *fsm.MigrationVolume, snap string) (uint64, error) {
		path := fmt.Sprintf("%s?id=%s&volume=%s&snap=%s&base=%s", rpcSend, id, v.Name, snap, v.LastSnapshot)
		resp, err := n.CallRPC(ctx, m.SourceID, http.MethodPost, path, nil)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var res sendResult
		if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
			return 0, err
		}
		if res.SourceGUID != res.TargetGUID {
			return 0, fmt.Errorf("volume %s@%s: GUID %d on the source, %d on the target", v.Name, snap, res.SourceGUID, res.TargetGUID)
		}
		v.BytesSent += res.Bytes
		v.LastSnapshot, v.GUID = snap, res.SourceGUID
		return res.Bytes, nil
	}
	call := func(machine, path string) error {
		resp, err := n.CallRPC(ctx, machine, http.MethodPost, path+"?id="+id, nil)
		if err != nil {
			return err
		}
		return resp.Body.Close()
	}

	vols := m.Volumes
	if err := advance(fsm.PhaseWarmCopy, vols); err != nil {
		return err
	}
	for round := 1; round <= warmRounds; round++ {
		var sent uint64
		for i := range vols {
			k, err := send(&vols[i], "drover-"+id+"-"+strconv.Itoa(round))
			if err != nil {
				return fmt.Errorf("warm copy round %d: %w", round, err)
			}
			sent += k
		}
		if err := advance(fsm.PhaseWarmCopy, vols); err != nil {
			return err
		}
		if sent < warmEnough {
			break
		}
	}
	if err := call(m.SourceID, rpcStopSource); err != nil {
		return fmt.Errorf("stopping the source: %w", err)
	}
	if err := advance(fsm.PhaseSourceStopped, nil); err != nil {
		return err
	}
	for i := range vols {
		if _, err := send(&vols[i], "drover-"+id+"-final"); err != nil {
			return fmt.Errorf("final copy: %w", err)
		}
	}
	if err := advance(fsm.PhaseFinalCopy, vols); err != nil {
		return err
	}
	if err := advance(fsm.PhaseTargetStarting, nil); err != nil {
		return err
	}
	if err := call(m.TargetID, rpcStartTarget); err != nil {
		return fmt.Errorf("starting on the target: %w", err)
	}
	// The point of no return.
	if _, err := n.Apply(ctx, fsm.CommitMigration{ID: id, Holder: holder, At: time.Now()}); err != nil {
		return fmt.Errorf("committing: %w", err)
	}
	// After the commit only forward: the reconcilers remove the source
	// container and adopt the target's; the source dataset is kept.
	fctx := context.WithoutCancel(ctx)
	for {
		if _, err := n.Apply(fctx, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseDone, At: time.Now()}); err == nil {
			return nil
		} else {
			a.logger.Warn("recording a committed migration as done; retrying", "id", id, "err", err)
		}
		time.Sleep(time.Second)
	}
}

// abortMigration undoes a migration before its commit.
func (a *Agent) abortMigration(ctx context.Context, n *cluster.Node, id string, cause error) {
	m, ok := a.migrationFact(n, id)
	if !ok || m.Phase.Committed() {
		return
	}
	n.Apply(ctx, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborting, Error: cause.Error(), At: time.Now()})
	for _, machine := range []string{m.TargetID, m.SourceID} {
		resp, err := n.CallRPC(ctx, machine, http.MethodPost, rpcAbort+"?id="+id, nil)
		if err != nil {
			a.logger.Error("undoing a migration", "id", id, "machine", a.nameOf(machine), "err", err)
			continue
		}
		resp.Body.Close()
	}
	n.Apply(ctx, fsm.AdvanceMigration{ID: id, Phase: fsm.PhaseAborted, At: time.Now()})
}

func (a *Agent) migrationFact(n *cluster.Node, id string) (fsm.Migration, bool) {
	var m fsm.Migration
	var ok bool
	n.Read(func(s *fsm.State) { m, ok = s.Migration(id) })
	return m, ok
}

func (a *Agent) migrationInfo(n *cluster.Node, id string) (ctlapi.MigrationInfo, error) {
	m, ok := a.migrationFact(n, id)
	if !ok {
		return ctlapi.MigrationInfo{}, fmt.Errorf("no migration %q", id)
	}
	return a.toInfo(m), nil
}

func (a *Agent) toInfo(m fsm.Migration) ctlapi.MigrationInfo {
	info := ctlapi.MigrationInfo{ID: m.ID, Service: m.Namespace + "/" + m.Service, Source: a.nameOf(m.SourceID),
		Target: a.nameOf(m.TargetID), Phase: string(m.Phase), Error: m.Error, StartedAt: m.StartedAt}
	for _, v := range m.Volumes {
		info.Volumes = append(info.Volumes, ctlapi.MigrationVolume{Name: v.Name, BytesSent: v.BytesSent, Snapshot: v.LastSnapshot})
	}
	if !m.SourceStoppedAt.IsZero() && !m.CommittedAt.IsZero() {
		info.Downtime = ctlapi.Duration(m.CommittedAt.Sub(m.SourceStoppedAt))
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

// runMigrationJanitor finishes the migrations whose executor is gone: when
// the namespace lock of a running migration is no longer held by its
// executor (its lease ran out), the leader's daemon aborts it if it had
// not committed and records it done if it had. Only the leader acts, so
// two machines never undo one migration at once.
func (a *Agent) runMigrationJanitor(ctx context.Context, n *cluster.Node) {
	defer a.wg.Done()
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if st, err := n.Status(); err != nil || st.Role != cluster.RoleLeader {
			continue
		}
		var orphans []fsm.Migration
		now := time.Now()
		n.Read(func(s *fsm.State) {
			for _, m := range s.Migrations() {
				if m.Phase.Terminal() {
					continue
				}
				if l, ok := s.Lock(m.Namespace); !ok || l.Holder != m.Holder || !l.ExpiresAt.After(now) {
					orphans = append(orphans, m)
				}
			}
		})
		for _, m := range orphans {
			if m.Phase.Committed() {
				a.logger.Info("completing a committed migration whose executor is gone", "id", m.ID)
				n.Apply(ctx, fsm.AdvanceMigration{ID: m.ID, Phase: fsm.PhaseDone, At: time.Now()})
				continue
			}
			a.logger.Warn("aborting a migration whose executor is gone", "id", m.ID, "phase", m.Phase)
			a.abortMigration(ctx, n, m.ID, errors.New("the executor's lease on the namespace lock ran out"))
		}
	}
}
