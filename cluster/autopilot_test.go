package cluster

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
)

// The promoter is pure logic: these tests feed it autopilot states.
func apState(now time.Time, servers map[string]autopilot.RaftState, unhealthySince map[string]time.Time) *autopilot.State {
	s := &autopilot.State{Servers: map[raft.ServerID]*autopilot.ServerState{}}
	for id, rs := range servers {
		h := autopilot.ServerHealth{Healthy: true, StableSince: now.Add(-time.Hour)}
		status := autopilot.NodeAlive
		if since, bad := unhealthySince[id]; bad {
			h = autopilot.ServerHealth{Healthy: false, StableSince: since}
			status = autopilot.NodeFailed
		}
		if rs == autopilot.RaftLeader {
			s.Leader = raft.ServerID(id)
		}
		s.Servers[raft.ServerID(id)] = &autopilot.ServerState{
			Server: autopilot.Server{ID: raft.ServerID(id), NodeStatus: status},
			State:  rs, Health: h,
		}
	}
	return s
}

func ids(v []raft.ServerID) []string {
	out := []string{}
	for _, id := range v {
		out = append(out, string(id))
	}
	slices.Sort(out)
	return out
}

func TestVoterPolicy(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	cfg := &autopilot.Config{}
	V, N, L := autopilot.RaftVoter, autopilot.RaftNonVoter, autopilot.RaftLeader
	cases := []struct {
		name           string
		servers        map[string]autopilot.RaftState
		unhealthy      map[string]time.Time
		promote, demot []string
	}{
		{"fills to three", map[string]autopilot.RaftState{"a": L, "b": N, "c": N, "d": N}, nil, []string{"b", "c"}, []string{}},
		{"three is enough for four", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": N}, nil, []string{}, []string{}},
		{"five alive make five voters", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": N, "e": N}, nil, []string{"d", "e"}, []string{}},
		{"gone voter replaced", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": N},
			map[string]time.Time{"c": now.Add(-time.Hour)}, []string{"d"}, []string{"c"}},
		{"briefly failed voter kept", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": N},
			map[string]time.Time{"c": now.Add(-time.Second)}, []string{}, []string{}},
		{"gone voter without replacement kept", map[string]autopilot.RaftState{"a": L, "b": V, "c": V},
			map[string]time.Time{"c": now.Add(-time.Hour)}, []string{}, []string{}},
		{"one candidate waits for a pair", map[string]autopilot.RaftState{"a": L, "b": N}, nil, []string{}, []string{}},
		{"a pair of candidates makes three", map[string]autopilot.RaftState{"a": L, "b": N, "c": N}, nil, []string{"b", "c"}, []string{}},
		{"two voters shrink to one", map[string]autopilot.RaftState{"a": L, "b": V}, nil, []string{}, []string{"b"}},
		{"four voters and a candidate make five", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": V, "e": N}, nil, []string{"e"}, []string{}},
		{"four voters without a candidate make three, never the leader", map[string]autopilot.RaftState{"d": L, "b": V, "c": V, "a": V}, nil, []string{}, []string{"c"}},
		{"six voters shrink to five, the gone first", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": V, "e": V, "f": V},
			map[string]time.Time{"b": now.Add(-time.Hour)}, []string{}, []string{"b"}},
		{"seven voters shrink to five", map[string]autopilot.RaftState{"a": L, "b": V, "c": V, "d": V, "e": V, "f": V, "g": V}, nil, []string{}, []string{"f", "g"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := &voterPolicy{deadAfter: time.Minute, now: func() time.Time { return now }}
			ch := p.CalculatePromotionsAndDemotions(cfg, apState(now, c.servers, c.unhealthy))
			if got := ids(ch.Promotions); fmt.Sprint(got) != fmt.Sprint(c.promote) {
				t.Errorf("promotions %v, want %v", got, c.promote)
			}
			if got := ids(ch.Demotions); fmt.Sprint(got) != fmt.Sprint(c.demot) {
				t.Errorf("demotions %v, want %v", got, c.demot)
			}
		})
	}
}
