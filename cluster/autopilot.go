package cluster

import (
	"context"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
)

// autopilotDelegate tells raft-autopilot what drover knows about servers:
// liveness from gossip, Raft progress from each server's stats RPC.
type autopilotDelegate struct{ n *Node }

func (d *autopilotDelegate) AutopilotConfig() *autopilot.Config {
	threshold := 10 * time.Second
	if hb := d.n.cfg.Timing.RaftHeartbeat; hb > 0 && 10*hb < threshold {
		threshold = 10 * hb
	}
	return &autopilot.Config{
		// Removing a machine is an operator's act (machine rm), never
		// autopilot's: a failed voter is demoted, not forgotten.
		CleanupDeadServers:      false,
		LastContactThreshold:    threshold,
		MaxTrailingLogs:         500,
		ServerStabilizationTime: d.n.cfg.Timing.StabilizationTime,
	}
}

func (d *autopilotDelegate) NotifyState(*autopilot.State) {}

func (d *autopilotDelegate) FetchServerStats(ctx context.Context, servers map[raft.ServerID]*autopilot.Server) map[raft.ServerID]*autopilot.ServerStats {
	var mu sync.Mutex
	var wg sync.WaitGroup
	out := map[raft.ServerID]*autopilot.ServerStats{}
	for id, srv := range servers {
		if srv.NodeStatus != autopilot.NodeAlive {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var st serverStats
			if string(id) == d.n.cfg.MachineID {
				st = d.n.localStats()
			} else {
				addr := d.n.rpcAddrOf(string(id))
				if addr == "" {
					return
				}
				var err error
				if st, err = d.n.rpc.stats(ctx, addr); err != nil {
					return
				}
			}
			mu.Lock()
			out[id] = &autopilot.ServerStats{LastContact: st.LastContact, LastTerm: st.LastTerm, LastIndex: st.LastIndex}
			mu.Unlock()
		}()
	}
	wg.Wait()
	return out
}

func (d *autopilotDelegate) KnownServers() map[raft.ServerID]*autopilot.Server {
	p, err := d.n.parts()
	if err != nil {
		return nil
	}
	f := p.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	_, leader := p.raft.LeaderWithID()
	out := map[raft.ServerID]*autopilot.Server{}
	for _, s := range f.Configuration().Servers {
		srv := &autopilot.Server{
			ID: s.ID, Address: s.Address, NodeStatus: autopilot.NodeUnknown,
			RaftVersion: raft.ProtocolVersionMax, IsLeader: s.ID == leader,
		}
		if m, ok := d.n.gossip.member(string(s.ID)); ok {
			srv.Name = m.Name
			srv.NodeStatus = nodeStatus(m.Liveness)
		}
		if string(s.ID) == d.n.cfg.MachineID {
			srv.NodeStatus = autopilot.NodeAlive
		}
		out[s.ID] = srv
	}
	return out
}

func nodeStatus(l Liveness) autopilot.NodeStatus {
	switch l {
	case LivenessAlive, LivenessSuspect:
		return autopilot.NodeAlive
	case LivenessFailed:
		return autopilot.NodeFailed
	case LivenessLeft:
		return autopilot.NodeLeft
	}
	return autopilot.NodeUnknown
}

// RemoveFailedServer is never called: CleanupDeadServers is off.
func (d *autopilotDelegate) RemoveFailedServer(*autopilot.Server) {}

// voterPolicy is drover's promoter: an odd number of voters — 1, 3 or 5,
// the largest odd number not above the machines alive, at most 5 — the
// rest non-voters. It only ever leaves an odd count: it grows in pairs
// (1 to 3, 3 to 5), and only with non-voters that have caught up and
// stayed healthy; a voter that has been unhealthy for longer than
// deadAfter counts as gone and is swapped one for one for such a
// non-voter; an even count (left by a removal) or too many voters shrink
// to the target, the gone ones first.
type voterPolicy struct {
	deadAfter time.Duration
	now       func() time.Time
}

// votersFor is the number of voters for that many machines alive.
func votersFor(alive int) int {
	switch {
	case alive >= 5:
		return 5
	case alive >= 3:
		return 3
	}
	return 1
}

func (p *voterPolicy) GetServerExt(*autopilot.Config, *autopilot.ServerState) any { return nil }
func (p *voterPolicy) GetStateExt(*autopilot.Config, *autopilot.State) any        { return nil }

func (p *voterPolicy) GetNodeTypes(_ *autopilot.Config, s *autopilot.State) map[raft.ServerID]autopilot.NodeType {
	types := map[raft.ServerID]autopilot.NodeType{}
	for id := range s.Servers {
		types[id] = autopilot.NodeVoter
	}
	return types
}

func (p *voterPolicy) FilterFailedServerRemovals(_ *autopilot.Config, _ *autopilot.State, f *autopilot.FailedServers) *autopilot.FailedServers {
	return f
}

func (p *voterPolicy) IsPotentialVoter(t autopilot.NodeType) bool { return t == autopilot.NodeVoter }

func (p *voterPolicy) CalculatePromotionsAndDemotions(c *autopilot.Config, s *autopilot.State) autopilot.RaftChanges {
	now := p.now()
	stable := s.ServerStabilizationTime(c)
	ids := make([]raft.ServerID, 0, len(s.Servers))
	alive := 0
	for id, srv := range s.Servers {
		ids = append(ids, id)
		if srv.Server.NodeStatus == autopilot.NodeAlive {
			alive++
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	var working, gone, candidates []raft.ServerID
	for _, id := range ids {
		srv := s.Servers[id]
		switch {
		case srv.HasVotingRights() && !srv.Health.Healthy && now.Sub(srv.Health.StableSince) > p.deadAfter:
			gone = append(gone, id)
		case srv.HasVotingRights():
			working = append(working, id)
		case srv.State == autopilot.RaftNonVoter && srv.Health.IsStable(now, stable):
			candidates = append(candidates, id)
		}
	}
	return planVoters(working, gone, candidates, votersFor(alive), s.Leader)
}

// planVoters decides promotions and demotions from the voters that work,
// the ones gone, the non-voters fit to vote and the target count: a pure
// function. Gone voters are swapped one for one; the count grows toward
// the target only to an odd number; a count above 5, or even, shrinks —
// unswapped gone voters first, then the last-named working ones, never
// the leader. A death alone does not shrink it: three voters with one
// dead keep their quorum, and the dead one counts again when it is back.
func planVoters(working, gone, candidates []raft.ServerID, target int, leader raft.ServerID) autopilot.RaftChanges {
	var ch autopilot.RaftChanges
	total := len(working) + len(gone)
	swap := min(len(gone), len(candidates))
	ch.Promotions = append(ch.Promotions, candidates[:swap]...)
	ch.Demotions = append(ch.Demotions, gone[:swap]...)
	grow := min(target-total, len(candidates)-swap)
	if grow > 0 && (total+grow)%2 == 0 {
		grow--
	}
	if grow > 0 {
		ch.Promotions = append(ch.Promotions, candidates[swap:swap+grow]...)
		total += grow
	}
	excess := max(total-5, 0)
	if (total-excess)%2 == 0 && total-excess > 1 {
		excess++
	}
	for _, id := range append(slices.Clone(gone[swap:]), reversed(working)...) {
		if excess == 0 {
			break
		}
		if id != leader {
			ch.Demotions = append(ch.Demotions, id)
			excess--
		}
	}
	return ch
}

func reversed(ids []raft.ServerID) []raft.ServerID {
	out := slices.Clone(ids)
	slices.Reverse(out)
	return out
}
