package cluster

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
)

// runLeaderLoop starts the leader's duties when this machine gains
// leadership and stops them when it loses it.
func (n *Node) runLeaderLoop(leaderCh <-chan bool) {
	defer n.wg.Done()
	var duty *leaderDuty
	defer func() { duty.stop() }()
	for {
		select {
		case <-n.ctx.Done():
			return
		case leading := <-leaderCh:
			if leading && duty == nil {
				duty = n.startLeading()
			} else if !leading {
				duty.stop()
				duty = nil
				n.leftLeadership.Store(time.Now().UnixNano())
			}
		}
	}
}

// leaderDuty is the running lead goroutine and the way to stop it.
type leaderDuty struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (n *Node) startLeading() *leaderDuty {
	ctx, cancel := context.WithCancel(n.ctx)
	d := &leaderDuty{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		n.lead(ctx)
	}()
	return d
}

func (d *leaderDuty) stop() {
	if d != nil {
		d.cancel()
		<-d.done
	}
}

// lead runs autopilot and the reconcile loop while this machine leads.
func (n *Node) lead(ctx context.Context) {
	p, err := n.parts()
	if err != nil {
		return
	}
	n.logger.Info("this machine leads the cluster")
	hlog := hclog.New(&hclog.LoggerOptions{Name: "autopilot", Output: newLevelWriter(n.logger, "autopilot"), Level: hclog.Info})
	ap := autopilot.New(p.raft, &autopilotDelegate{n: n},
		autopilot.WithLogger(hlog),
		autopilot.WithPromoter(&voterPolicy{deadAfter: n.cfg.Timing.DeadServerAfter, now: n.cfg.Now}),
		autopilot.WithReconcileInterval(n.cfg.Timing.ReconcileInterval),
		autopilot.WithUpdateInterval(n.cfg.Timing.ReconcileInterval),
	)
	ap.Start(ctx)
	defer func() { <-ap.Stop() }()
	tick := time.NewTicker(n.cfg.Timing.ReconcileInterval)
	defer tick.Stop()
	// applied: every entry before this term is in the facts, so a server
	// they do not hold is a removed machine's (reconcile takes it out).
	applied := false
	for {
		if !applied {
			applied = p.raft.Barrier(n.cfg.Timing.ReconcileInterval).Error() == nil
		}
		n.reconcile(ctx, p, applied)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-n.nudge:
		}
	}
}

// reconcile brings Raft membership and the machine facts in line with
// gossip, and expires namespace locks whose lease ran out.
func (n *Node) reconcile(ctx context.Context, p *raftParts, applied bool) {
	f := p.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return
	}
	inRaft := map[raft.ServerID]raft.Server{}
	for _, s := range f.Configuration().Servers {
		inRaft[s.ID] = s
	}
	facts := map[string]fsm.Machine{}
	var expired bool
	now := n.cfg.Now()
	n.facts.read(func(s *fsm.State) {
		for _, m := range s.Machines() {
			facts[m.ID] = m
		}
		for _, l := range s.Locks() {
			if !l.ExpiresAt.After(now) {
				expired = true
			}
		}
	})

	// A server whose machine the facts no longer hold was removed: a round
	// that read the facts just before the removal, while gossip still
	// showed the stopped machine alive, may have added it back.
	for id := range inRaft {
		if _, ok := facts[string(id)]; ok || !applied || string(id) == n.cfg.MachineID {
			continue
		}
		n.logger.Info("taking a removed machine out of Raft", "id", id)
		if err := p.raft.RemoveServer(id, 0, 10*time.Second).Error(); err != nil {
			n.logger.Warn("could not take a removed machine out of Raft", "id", id, "err", err)
		}
		delete(inRaft, id)
	}

	members := n.gossip.snapshot()
	// Servers gossip shows alive: a machine is added to Raft only while
	// they are fewer than MaxServers; the others follow the facts.
	aliveServers := 0
	for _, m := range members {
		if _, ok := inRaft[raft.ServerID(m.MachineID)]; ok && m.Liveness == LivenessAlive {
			aliveServers++
		}
	}
	// This machine first: when it bootstraps it takes the first address.
	slices.SortStableFunc(members, func(a, b Member) int {
		return cmp.Compare(boolRank(a.MachineID != n.cfg.MachineID), boolRank(b.MachineID != n.cfg.MachineID))
	})
	for _, m := range members {
		if m.Liveness != LivenessAlive {
			continue
		}
		have, known := facts[m.MachineID]
		if known && ImpostorOf(have, m) {
			// Gossip claims a registered machine with another WireGuard
			// key: a key holder pretending to be it. Nothing it says is
			// taken, neither its registration nor its Raft address.
			n.warnImpostor(m, have)
			continue
		}
		grant := ""
		if !known && m.MachineID != n.cfg.MachineID {
			var refused string
			n.facts.read(func(s *fsm.State) { grant, refused = admission(s, m.Meta, now) })
			if refused != "" {
				n.refuse(m, refused)
				continue
			}
		}
		if !n.registerAndAllocate(ctx, m, have, grant) && !known {
			continue
		}
		if m.RaftAddr == "" {
			continue
		}
		if ctx.Err() != nil {
			return
		}
		id := raft.ServerID(m.MachineID)
		addr := raft.ServerAddress(m.RaftAddr)
		if s, ok := inRaft[id]; !ok {
			if aliveServers >= n.cfg.maxServers() {
				continue // it follows the facts from a server
			}
			n.logger.Info("making machine a Raft server, as non-voter", "machine", m.Name, "addr", addr, "servers_alive", aliveServers)
			if err := p.raft.AddNonvoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				n.logger.Warn("could not add machine to raft", "machine", m.Name, "err", err)
			} else {
				aliveServers++
			}
		} else if s.Address != addr {
			n.logger.Info("machine's raft address changed", "machine", m.Name, "from", s.Address, "to", addr)
			add := p.raft.AddNonvoter
			if s.Suffrage == raft.Voter {
				add = p.raft.AddVoter
			}
			if err := add(id, addr, 0, 10*time.Second).Error(); err != nil {
				n.logger.Warn("could not update raft address", "machine", m.Name, "err", err)
			}
		}
	}
	if expired {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := n.Apply(cctx, fsm.ExpireLocks{At: now})
		cancel()
		if err != nil && !errors.Is(err, context.Canceled) {
			n.logger.Warn("could not expire locks", "err", err)
		}
	}
}

// registerAndAllocate registers (or updates) a machine's fact from its
// gossip metadata, admitting a new one with grant, and gives it an
// overlay address if it has none. It reports whether the machine is
// registered.
func (n *Node) registerAndAllocate(ctx context.Context, m Member, have fsm.Machine, grant string) bool {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if want := machineFromMember(m); !sameRegistration(have, want) {
		if _, err := n.Apply(cctx, fsm.RegisterMachine{Machine: want, Grant: grant, At: n.cfg.Now()}); err != nil {
			var rule *fsm.RuleError
			if errors.As(err, &rule) && (errors.Is(err, fsm.ErrGrantRefused) || errors.Is(err, fsm.ErrMachineRevoked)) {
				n.refuse(m, rule.Message)
			} else {
				n.logger.Warn("could not register machine", "machine", m.Name, "err", err)
			}
			return false
		}
		if grant != "" {
			n.logger.Info("admitted a new machine", "machine", m.Name, "id", m.MachineID, "join_token", grant)
		}
	}
	if !n.cfg.OverlayPrefix.IsValid() || (have.OverlayIP.IsValid() && n.cfg.OverlayPrefix.Contains(have.OverlayIP)) {
		return true
	}
	raw, err := n.Apply(cctx, fsm.AllocateOverlayIP{MachineID: m.MachineID, Prefix: n.cfg.OverlayPrefix, At: n.cfg.Now()})
	if err != nil {
		n.logger.Warn("could not allocate an overlay address", "machine", m.Name, "err", err)
		return true
	}
	n.logger.Info("allocated overlay address", "machine", m.Name, "overlay", string(raw))
	return true
}

// ImpostorOf tells whether gossip member m claims the id of the
// registered machine have with another WireGuard key. A machine's key is
// bound when it is first registered: a machine that lost its key leaves
// (`machine rm`) and joins again.
func ImpostorOf(have fsm.Machine, m Member) bool {
	return have.ID != "" && have.WGPublicKey != "" && m.WGPublicKey != "" && m.WGPublicKey != have.WGPublicKey
}

// warnImpostor logs a refused identity claim once per claimed key.
func (n *Node) warnImpostor(m Member, have fsm.Machine) {
	n.impostorsMu.Lock()
	defer n.impostorsMu.Unlock()
	if n.impostors == nil {
		n.impostors = map[string]bool{}
	}
	if k := m.MachineID + "/" + m.WGPublicKey; !n.impostors[k] {
		n.impostors[k] = true
		n.logger.Warn("refused gossip claiming a registered machine with another WireGuard key",
			"machine", have.Name, "id", m.MachineID, "registered_key", have.WGPublicKey, "claimed_key", m.WGPublicKey, "from", m.GossipAddr.String())
	}
}

func boolRank(b bool) int {
	if b {
		return 1
	}
	return 0
}

func machineFromMember(m Member) fsm.Machine {
	return fsm.Machine{
		ID:          m.MachineID,
		Name:        m.Name,
		GossipAddr:  m.GossipAddr.String(),
		RaftAddr:    m.RaftAddr,
		RPCAddr:     m.RPCAddr,
		WGPublicKey: m.WGPublicKey,
		WGEndpoint:  m.WGEndpoint,
		Capacity:    fsm.Capacity{MemoryBytes: m.MemoryBytes, DiskBytes: m.DiskBytes},
	}
}

// sameRegistration compares the fields a machine reports about itself.
func sameRegistration(have, want fsm.Machine) bool {
	return have.ID == want.ID && have.Name == want.Name && have.GossipAddr == want.GossipAddr &&
		have.RaftAddr == want.RaftAddr && have.RPCAddr == want.RPCAddr &&
		have.WGPublicKey == want.WGPublicKey && have.WGEndpoint == want.WGEndpoint &&
		have.Capacity == want.Capacity
}
