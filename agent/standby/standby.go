// Package standby keeps standby copies of services' volumes on another
// machine, fences an owner that lost the majority by a lease, and fails a
// service over to its standby when its owner is gone. See DESIGN.md.
package standby

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/volume"
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
	FactsChanged() <-chan struct{}
}

// Members tells who is alive and whether this machine leads.
type Members interface {
	Member(id string) (cluster.Member, bool)
	IsLeader() bool
}

// Volumes are this machine's datasets, as replication needs them.
type Volumes interface {
	Snapshot(namespace, name, snap string) (volume.Snapshot, error)
	Send(namespace, name, snap, base string, w io.Writer) error
	Get(namespace, name string) (volume.Info, error)
	ReceiveStandby(namespace, name, service string, incremental bool, r io.Reader) error
	PruneStandbySnapshots(namespace, name string, keep int) error
	SetAsideDiverged(namespace, name, base, service string, now time.Time) (string, uint64, error)
	StandbyOf(namespace, name string) string
}

// Containers stops a fenced service's container.
type Containers interface {
	List(ctx context.Context) ([]runtime.Container, error)
	Stop(ctx context.Context, id string, grace time.Duration) (runtime.Stopped, error)
}

// Observer counts replication (agent/metrics).
type Observer interface {
	Replicated(service string, bytes uint64, took time.Duration)
	StandbyLag(service string, lag time.Duration)
}

// Config is this machine as the standby part needs it.
type Config struct {
	Self     string
	Name     string
	Logger   *slog.Logger
	Observer Observer // nil: none
	// KeepSnapshots is how many standby snapshots each side keeps (3
	// when zero).
	KeepSnapshots int
}

// Standby is this machine's part in standby replicas: owner, standby,
// old owner, and (on the leader) automatic failover.
type Standby struct {
	cfg     Config
	facts   Facts
	members Members
	peers   peer.Caller
	vols    Volumes // nil: this machine holds no volumes
	rt      Containers

	renewedUntil atomic.Pointer[time.Time] // local deadline of the last renewal known committed

	mu         sync.Mutex
	replicated map[string]time.Time // service key -> when its last replication began
}

// New makes the part; vols is nil on a machine without volumes.
func New(cfg Config, facts Facts, members Members, peers peer.Caller, vols Volumes, rt Containers) *Standby {
	if cfg.KeepSnapshots == 0 {
		cfg.KeepSnapshots = 3
	}
	return &Standby{cfg: cfg, facts: facts, members: members, peers: peers, vols: vols, rt: rt, replicated: map[string]time.Time{}}
}

// Errors callers match.
var (
	ErrNotOwner    = peer.NewError("standby_not_owner", "the caller does not run the service")
	ErrNotStandby  = peer.NewError("standby_not_standby", "this machine is not the service's standby")
	ErrInUse       = peer.NewError("standby_in_use", "the dataset is in use here: never received into")
	ErrOwnerAlive  = errors.New("the owner is alive")
	ErrLeaseActive = errors.New("the owner's lease has not run out")
)

// Wire routes.
var (
	routeReceive = peer.Upload[receiveRequest, receiveResult]{Path: "standby/v1/receive"}
	routeCopies  = peer.Route[copiesRequest, copiesResult]{Path: "standby/v1/copies"}
)

type receiveRequest struct {
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
	Volume    string `json:"volume"`
	Snap      string `json:"snap"`
	Base      string `json:"base,omitempty"`
}

type receiveResult struct{}

type copiesRequest struct {
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
}

type copiesResult struct {
	Snapshots map[string][]volume.Snapshot `json:"snapshots"` // by volume; none: no copy
}

// Register serves the standby's side on s; call it before s starts.
func (s *Standby) Register(srv peer.Server) {
	peer.HandleUpload(srv, routeReceive, s.handleReceive)
	peer.Handle(srv, routeCopies, s.handleCopies)
}

// Run runs the loops of this machine's part until ctx ends, and returns
// once they have all stopped.
func (s *Standby) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, loop := range []func(context.Context){s.leaseLoop, s.fenceLoop, s.replicateLoop, s.autoFailoverLoop, s.settleLoop} {
		wg.Go(func() { loop(ctx) })
	}
	wg.Wait()
}

// owned lists the services with a standby this machine owns.
func (s *Standby) owned(st *fsm.State) []fsm.Service {
	var out []fsm.Service
	for _, sv := range st.Services() {
		if sv.MachineID == s.cfg.Self && sv.Spec.Standby != nil {
			out = append(out, sv)
		}
	}
	return out
}

// --- the lease and the fence ---

// Holds tells whether this machine's lease holds, with the margin to stop
// before it runs out: from the last renewal this process saw committed,
// or, after a restart, from the lease the facts record (set by this
// machine's own clock; leases only grow, so stale facts under-state it).
func (s *Standby) Holds() bool {
	now := time.Now()
	if until := s.renewedUntil.Load(); until != nil && now.Before(*until) {
		return true
	}
	var l fsm.Lease
	var ok bool
	s.facts.Read(func(st *fsm.State) { l, ok = st.LeaseOf(s.cfg.Self) })
	return ok && now.Before(l.Until.Add(-fsm.LeaseStopMargin))
}

// Fenced tells whether a service may not run here now: it has a standby
// and this machine's lease does not hold (reconcile asks).
func (s *Standby) Fenced(sv fsm.Service) bool {
	return sv.Spec.Standby != nil && !s.Holds()
}

// renewEvery is how often an owner renews.
const renewEvery = fsm.StandbyLease / 5

// needsLease tells whether this machine runs, or may soon run, a service
// with a standby: it owns one, is its standby (a failover makes it the
// owner) or the target of its move. Such a machine holds its lease
// before it can become the owner, so it is never fenced the moment it is.
func (s *Standby) needsLease(st *fsm.State) bool {
	for _, sv := range st.Services() {
		if sv.Spec.Standby == nil {
			continue
		}
		m, moving := st.ActiveMigration(sv.Namespace, sv.Spec.Name)
		if sv.MachineID == s.cfg.Self || sv.StandbyID == s.cfg.Self || (moving && m.TargetID == s.cfg.Self) {
			return true
		}
	}
	return false
}

func (s *Standby) leaseLoop(ctx context.Context) {
	tick := time.NewTicker(renewEvery)
	defer tick.Stop()
	for {
		changed := s.facts.FactsChanged()
		var need bool
		s.facts.Read(func(st *fsm.State) { need = s.needsLease(st) })
		if need {
			sent := time.Now()
			actx, cancel := context.WithTimeout(ctx, renewEvery)
			_, err := s.facts.Apply(actx, fsm.RenewLease{MachineID: s.cfg.Self, Duration: fsm.StandbyLease, At: sent})
			cancel()
			if err == nil {
				until := sent.Add(fsm.StandbyLease - fsm.LeaseStopMargin) // monotonic: a clock step changes nothing
				s.renewedUntil.Store(&until)
			} else if ctx.Err() == nil {
				s.cfg.Logger.Warn("renewing the lease of services with a standby", "err", err)
			}
		}
		if !wake(ctx, need, tick.C, changed) {
			return
		}
	}
}

// wake waits for a loop's next round: its tick while it has work, the
// next change of the facts while it has none — only the facts give it
// work — so a machine without services with a standby does not wake for
// these loops at all. changed must be taken before the facts were read.
// It returns false once ctx ends.
func wake(ctx context.Context, busy bool, tick <-chan time.Time, changed <-chan struct{}) bool {
	if busy {
		changed = nil
	} else {
		tick = nil
	}
	select {
	case <-ctx.Done():
		return false
	case <-tick:
	case <-changed:
	}
	return true
}

// whenBusy waits, for each change of the facts, until busy tells the
// loop has work, then for its tick. It returns false once ctx ends.
func (s *Standby) whenBusy(ctx context.Context, tick <-chan time.Time, busy func() bool) bool {
	for {
		changed := s.facts.FactsChanged()
		if busy() {
			return wake(ctx, true, tick, changed)
		}
		if !wake(ctx, false, tick, changed) {
			return false
		}
	}
}

// anyAutoFailover tells whether a service asks for automatic failover.
func (s *Standby) anyAutoFailover() bool {
	var auto bool
	s.facts.Read(func(st *fsm.State) {
		for _, sv := range st.Services() {
			auto = auto || sv.Spec.Standby != nil && sv.Spec.Standby.Failover == fsm.FailoverAuto
		}
	})
	return auto
}

// ownsAny tells whether this machine owns a service with a standby.
func (s *Standby) ownsAny() bool {
	var owns bool
	s.facts.Read(func(st *fsm.State) { owns = len(s.owned(st)) > 0 })
	return owns
}

// fenceLoop stops, as soon as the lease does not hold, every container of
// a service with a standby this machine owns: it may be failed over.
func (s *Standby) fenceLoop(ctx context.Context) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		if !s.whenBusy(ctx, tick.C, s.ownsAny) {
			return
		}
		if s.Holds() {
			continue
		}
		fenced := map[string]bool{}
		s.facts.Read(func(st *fsm.State) {
			for _, sv := range s.owned(st) {
				if _, moving := st.ActiveMigration(sv.Namespace, sv.Spec.Name); !moving {
					fenced[sv.Key()] = true
				}
			}
		})
		if len(fenced) == 0 {
			continue
		}
		cs, err := s.rt.List(ctx)
		if err != nil {
			continue
		}
		for _, c := range cs {
			if c.Running && fenced[c.Key()] {
				s.cfg.Logger.Warn("lease not renewed: stopping a service with a standby before it may be failed over", "service", c.Key())
				if _, err := s.rt.Stop(ctx, c.ID, time.Second); err != nil {
					s.cfg.Logger.Warn("stopping a fenced service", "service", c.Key(), "err", err)
				}
			}
		}
	}
}

// --- replication, on the owner ---

func (s *Standby) replicateLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		// A tick before the first round too: the reconciler takes over the
		// volumes of a service just failed over here first, and a round at
		// once raced it (it listed snapshots the round pruned).
		if !s.whenBusy(ctx, tick.C, func() bool { return s.vols != nil && s.ownsAny() }) {
			return
		}
		var due []fsm.Service
		s.facts.Read(func(st *fsm.State) {
			for _, sv := range s.owned(st) {
				if _, moving := st.ActiveMigration(sv.Namespace, sv.Spec.Name); moving || sv.StandbyID == "" {
					continue
				}
				s.mu.Lock()
				last := s.replicated[sv.Key()]
				s.mu.Unlock()
				if time.Since(last) >= sv.Spec.Standby.Interval {
					due = append(due, sv)
				}
				if sv.Replica != nil && s.cfg.Observer != nil {
					s.cfg.Observer.StandbyLag(sv.Key(), time.Since(sv.Replica.TakenAt))
				}
			}
		})
		for _, sv := range due {
			s.mu.Lock()
			s.replicated[sv.Key()] = time.Now()
			s.mu.Unlock()
			if err := s.Replicate(ctx, sv); err != nil && ctx.Err() == nil {
				s.cfg.Logger.Warn("refreshing the standby copy", "service", sv.Key(), "standby", factview.NameOf(s.members, s.facts, sv.StandbyID), "err", err)
			}
		}
	}
}

// Replicate snapshots every volume of a service this machine owns at one
// moment, sends each to the standby (from the newest snapshot both have),
// and records the replica.
func (s *Standby) Replicate(ctx context.Context, sv fsm.Service) error {
	began := time.Now()
	snap := volume.StandbySnapshotPrefix + strconv.FormatInt(began.UnixMilli(), 10)
	for _, v := range sv.Spec.Volumes {
		if _, err := s.vols.Snapshot(sv.Namespace, v.Name, snap); err != nil {
			return err
		}
	}
	copies, err := routeCopies.Call(ctx, s.peers, sv.StandbyID, copiesRequest{Namespace: sv.Namespace, Service: sv.Spec.Name})
	if err != nil {
		return fmt.Errorf("asking the standby for its copies: %w", err)
	}
	var sent uint64
	for _, v := range sv.Spec.Volumes {
		info, err := s.vols.Get(sv.Namespace, v.Name)
		if err != nil {
			return err
		}
		base := newestCommon(info.Snapshots, copies.Snapshots[v.Name], snap)
		n, err := s.send(ctx, sv, v.Name, snap, base)
		if err != nil {
			return err
		}
		sent += n
		if err := s.vols.PruneStandbySnapshots(sv.Namespace, v.Name, s.cfg.KeepSnapshots); err != nil {
			s.cfg.Logger.Warn("pruning standby snapshots", "volume", sv.Namespace+"/"+v.Name, "err", err)
		}
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = s.facts.Apply(actx, fsm.RecordReplica{Namespace: sv.Namespace, Name: sv.Spec.Name, OwnerID: s.cfg.Self, StandbyID: sv.StandbyID,
		Snapshot: snap, TakenAt: began, Bytes: sent, At: time.Now()})
	if err != nil {
		return fmt.Errorf("recording the replica: %w", err)
	}
	if s.cfg.Observer != nil {
		s.cfg.Observer.Replicated(sv.Key(), sent, time.Since(began))
		s.cfg.Observer.StandbyLag(sv.Key(), time.Since(began))
	}
	s.cfg.Logger.Debug("standby copy refreshed", "service", sv.Key(), "snapshot", snap, "bytes", sent, "took", time.Since(began))
	return nil
}

// newestCommon is the newest snapshot of mine (other than snap) the
// standby has too, by GUID: the base of an increment; empty: none.
func newestCommon(mine, theirs []volume.Snapshot, snap string) string {
	have := map[uint64]bool{}
	for _, t := range theirs {
		have[t.GUID] = true
	}
	for i := len(mine) - 1; i >= 0; i-- {
		if mine[i].Name != snap && have[mine[i].GUID] {
			return mine[i].Name
		}
	}
	return ""
}

// send streams one volume's snapshot to the standby.
func (s *Standby) send(ctx context.Context, sv fsm.Service, vol, snap, base string) (uint64, error) {
	pr, pw := io.Pipe()
	var n atomic.Uint64
	go func() {
		pw.CloseWithError(s.vols.Send(sv.Namespace, vol, snap, base, &counter{w: pw, n: &n}))
	}()
	_, err := routeReceive.Call(ctx, s.peers, sv.StandbyID, receiveRequest{Namespace: sv.Namespace, Service: sv.Spec.Name, Volume: vol, Snap: snap, Base: base}, pr)
	pr.CloseWithError(errors.New("the standby answered"))
	if err != nil {
		return 0, fmt.Errorf("sending %s/%s@%s to the standby: %w", sv.Namespace, vol, snap, err)
	}
	return n.Load(), nil
}

type counter struct {
	w io.Writer
	n *atomic.Uint64
}

func (c *counter) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	c.n.Add(uint64(k))
	return k, err
}

// --- the standby's side ---

// standbyOf checks that a request comes from the service's owner and that
// this machine is its standby.
func (s *Standby) standbyOf(ctx context.Context, ns, name string) (fsm.Service, error) {
	var sv fsm.Service
	var ok, moving bool
	s.facts.Read(func(st *fsm.State) {
		sv, ok = st.Service(ns, name)
		m, active := st.ActiveMigration(ns, name)
		moving = active && m.TargetID == s.cfg.Self
	})
	switch {
	case !ok || peer.From(ctx) != sv.MachineID:
		return sv, fmt.Errorf("%w: %s/%s", ErrNotOwner, ns, name)
	case sv.StandbyID != s.cfg.Self || moving || s.vols == nil:
		return sv, fmt.Errorf("%w: %s/%s", ErrNotStandby, ns, name)
	}
	return sv, nil
}

func (s *Standby) handleCopies(ctx context.Context, _ string, req copiesRequest) (copiesResult, error) {
	sv, err := s.standbyOf(ctx, req.Namespace, req.Service)
	if err != nil {
		return copiesResult{}, err
	}
	out := copiesResult{Snapshots: map[string][]volume.Snapshot{}}
	for _, v := range sv.Spec.Volumes {
		if info, err := s.vols.Get(sv.Namespace, v.Name); err == nil {
			out.Snapshots[v.Name] = info.Snapshots
		}
	}
	return out, nil
}

func (s *Standby) handleReceive(ctx context.Context, _ string, req receiveRequest, body peer.Body) (receiveResult, error) {
	sv, err := s.standbyOf(ctx, req.Namespace, req.Service)
	if err != nil {
		return receiveResult{}, err
	}
	var owner string
	s.facts.Read(func(st *fsm.State) {
		if v, ok := st.Volume(req.Namespace, req.Volume); ok {
			owner = v.OwnerID
		}
	})
	if owner == s.cfg.Self {
		return receiveResult{}, fmt.Errorf("volume %s/%s is this machine's: %w", req.Namespace, req.Volume, ErrInUse)
	}
	if f := sv.LastFailover; f != nil && f.From == s.cfg.Self && !f.Settled {
		// The dataset holds what this machine wrote before the failover:
		// set aside first (settleLoop), never received over.
		return receiveResult{}, fmt.Errorf("%s/%s: this machine's copy from before the failover is not set aside yet: %w", req.Namespace, req.Volume, ErrInUse)
	}
	if err := s.vols.ReceiveStandby(req.Namespace, req.Volume, sv.Key(), req.Base != "", body); err != nil {
		return receiveResult{}, err
	}
	if err := s.vols.PruneStandbySnapshots(req.Namespace, req.Volume, s.cfg.KeepSnapshots); err != nil {
		s.cfg.Logger.Warn("pruning standby snapshots", "volume", req.Namespace+"/"+req.Volume, "err", err)
	}
	return receiveResult{}, nil
}

// --- failover ---

// Failover moves a service whose owner is gone to its standby, once the
// owner's lease ran out, and waits until it is ready there.
func (s *Standby) Failover(ctx context.Context, req ctlapi.FailoverRequest) (ctlapi.FailoverResult, error) {
	ns, name, err := factview.SplitService(req.Service)
	if err != nil {
		return ctlapi.FailoverResult{}, err
	}
	var sv fsm.Service
	var ok bool
	var lease fsm.Lease
	s.facts.Read(func(st *fsm.State) {
		sv, ok = st.Service(ns, name)
		lease, _ = st.LeaseOf(sv.MachineID)
	})
	if !ok {
		return ctlapi.FailoverResult{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService, Err: fmt.Errorf("no service %s", req.Service)}
	}
	owner := factview.NameOf(s.members, s.facts, sv.MachineID)
	to := sv.StandbyID
	if req.To != "" {
		m, err := factview.MachineByName(s.facts, s.cfg.Self, req.To)
		if err != nil {
			return ctlapi.FailoverResult{}, err
		}
		to = m.ID
	}
	refuse := func(err error) (ctlapi.FailoverResult, error) {
		return ctlapi.FailoverResult{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeFailoverRefused, Err: err}
	}
	switch {
	case sv.Spec.Standby == nil || sv.StandbyID == "":
		return refuse(fmt.Errorf("%s has no standby: nothing to fail over to", req.Service))
	case sv.Replica == nil:
		return refuse(fmt.Errorf("%s: its standby %s holds no copy yet", req.Service, factview.NameOf(s.members, s.facts, sv.StandbyID)))
	case to != sv.StandbyID:
		return refuse(fmt.Errorf("%s is not the standby of %s (%s is)", req.To, req.Service, factview.NameOf(s.members, s.facts, sv.StandbyID)))
	}
	if mb, ok := s.members.Member(sv.MachineID); ok && mb.Liveness == cluster.LivenessAlive {
		return refuse(fmt.Errorf("%w: %s runs %s and is alive: move it with droverctl migrate", ErrOwnerAlive, owner, req.Service))
	}
	if wait := time.Until(lease.Until.Add(fsm.ClockDriftMargin)); wait > 0 {
		return refuse(fmt.Errorf("%w: %s's lease on %s runs %s more (until %s, plus %s for clock drift)", ErrLeaseActive, owner, req.Service,
			wait.Round(100*time.Millisecond), lease.Until.UTC().Format(time.RFC3339), fsm.ClockDriftMargin))
	}
	began := time.Now()
	res, err := s.facts.Apply(ctx, fsm.Failover{Namespace: ns, Name: name, To: to, At: began})
	if err != nil {
		if errors.Is(err, fsm.ErrLeaseHeld) || errors.Is(err, fsm.ErrNoStandby) {
			return refuse(err)
		}
		return ctlapi.FailoverResult{}, fmt.Errorf("failing %s over: %w", req.Service, err)
	}
	var moved fsm.Service
	if err := json.Unmarshal(res, &moved); err != nil || moved.LastFailover == nil {
		return ctlapi.FailoverResult{}, fmt.Errorf("reading the failover's result: %v", err)
	}
	f := moved.LastFailover
	s.cfg.Logger.Warn("failed a service over to its standby", "service", req.Service, "from", owner, "to", factview.NameOf(s.members, s.facts, to),
		"snapshot", f.Snapshot, "loss_window", f.At.Sub(f.TakenAt))
	out := ctlapi.FailoverResult{Service: req.Service, From: owner, To: factview.NameOf(s.members, s.facts, to), Snapshot: f.Snapshot,
		SnapshotTakenAt: f.TakenAt, FailedOverAt: f.At, LossWindow: ctlapi.Duration(f.At.Sub(f.TakenAt))}
	if err := s.waitReady(ctx, ns, name, to); err != nil {
		return out, err
	}
	out.Took = ctlapi.Duration(time.Since(began))
	return out, nil
}

// waitReady waits until the service reports ready on machine.
func (s *Standby) waitReady(ctx context.Context, ns, name, machine string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for {
		var sv fsm.Service
		s.facts.Read(func(st *fsm.State) { sv, _ = st.Service(ns, name) })
		if sv.MachineID == machine && sv.Status.Generation == sv.Generation && sv.Status.Ready {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s/%s to be ready on its new machine: %w (status: %s)", ns, name, ctx.Err(), sv.Status.Error)
		case <-s.facts.FactsChanged():
		case <-time.After(time.Second):
		}
	}
}

// autoFailoverLoop, on the leader, fails over the services whose policy
// is auto once their owner is not alive and its lease ran out, plus the
// margin and the policy's after.
func (s *Standby) autoFailoverLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if !s.whenBusy(ctx, tick.C, s.anyAutoFailover) {
			return
		}
		if !s.members.IsLeader() {
			continue
		}
		now := time.Now()
		var due []fsm.Service
		s.facts.Read(func(st *fsm.State) {
			for _, sv := range st.Services() {
				if sv.Spec.Standby == nil || sv.Spec.Standby.Failover != fsm.FailoverAuto || sv.Replica == nil || sv.StandbyID == "" {
					continue
				}
				if mb, ok := s.members.Member(sv.MachineID); ok && mb.Liveness == cluster.LivenessAlive {
					continue
				}
				if sb, ok := s.members.Member(sv.StandbyID); !ok || sb.Liveness != cluster.LivenessAlive {
					continue
				}
				l, _ := st.LeaseOf(sv.MachineID)
				if now.After(l.Until.Add(fsm.ClockDriftMargin + sv.Spec.Standby.After)) {
					due = append(due, sv)
				}
			}
		})
		for _, sv := range due {
			actx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := s.facts.Apply(actx, fsm.Failover{Namespace: sv.Namespace, Name: sv.Spec.Name, To: sv.StandbyID, At: time.Now()})
			cancel()
			if err != nil {
				s.cfg.Logger.Warn("automatic failover", "service", sv.Key(), "err", err)
				continue
			}
			s.cfg.Logger.Warn("failed a service over to its standby, as its policy asks", "service", sv.Key(),
				"from", factview.NameOf(s.members, s.facts, sv.MachineID), "to", factview.NameOf(s.members, s.facts, sv.StandbyID),
				"snapshot", sv.Replica.Snapshot, "loss_window", time.Since(sv.Replica.TakenAt))
		}
	}
}

// --- the old owner, back ---

// settleLoop, on a machine a failover took a service from, stops the
// service if it still runs here, keeps each volume's copy aside, counts
// what it wrote after the replica, makes the copy in place the new
// standby's, and says so in the facts.
func (s *Standby) settleLoop(ctx context.Context) {
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	busy := true // a first look on the tick; then again on it only while a failover is left unsettled
	for {
		changed := s.facts.FactsChanged()
		if !wake(ctx, busy, tick.C, changed) {
			return
		}
		var todo []fsm.Service
		s.facts.Read(func(st *fsm.State) {
			for _, sv := range st.Services() {
				if f := sv.LastFailover; f != nil && f.From == s.cfg.Self && !f.Settled {
					todo = append(todo, sv)
				}
			}
		})
		busy = false
		for _, sv := range todo {
			if err := s.settle(ctx, sv); err != nil && ctx.Err() == nil {
				busy = true
				s.cfg.Logger.Warn("settling a failover away from this machine", "service", sv.Key(), "err", err)
			}
		}
	}
}

func (s *Standby) settle(ctx context.Context, sv fsm.Service) error {
	cs, err := s.rt.List(ctx)
	if err != nil {
		return err
	}
	for _, c := range cs {
		if c.Key() == sv.Key() && c.Running {
			// It must never serve here again; the reconciler removes it.
			if _, err := s.rt.Stop(ctx, c.ID, time.Second); err != nil {
				return err
			}
		}
	}
	f := sv.LastFailover
	var kept []string
	var diverged uint64
	if s.vols != nil {
		for _, v := range sv.Spec.Volumes {
			if _, err := s.vols.Get(sv.Namespace, v.Name); errors.Is(err, volume.ErrNotFound) {
				continue
			} else if err != nil {
				return err
			}
			if s.vols.StandbyOf(sv.Namespace, v.Name) == sv.Key() {
				continue // set aside already, by an attempt that did not reach the facts
			}
			k, n, err := s.vols.SetAsideDiverged(sv.Namespace, v.Name, f.Snapshot, sv.Key(), time.Now())
			if err != nil {
				return err
			}
			kept, diverged = append(kept, k), diverged+n
		}
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := s.facts.Apply(actx, fsm.SettleFailover{Namespace: sv.Namespace, Name: sv.Spec.Name, MachineID: s.cfg.Self,
		DivergedBytes: diverged, KeptAs: kept, At: time.Now()}); err != nil {
		return err
	}
	s.cfg.Logger.Warn("a failover took a service from this machine: its copy is kept aside and it is now the standby",
		"service", sv.Key(), "written_after_the_replica_bytes", diverged, "kept", kept, "replica", f.Snapshot)
	return nil
}
