package cluster

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/testpoll"
)

// startNewcomer starts node i with the cluster's key, sets its metadata
// with meta, and joins it through m1 over gossip.
func (tc *testCluster) startNewcomer(i int, meta func(*Meta)) *Node {
	tc.t.Helper()
	for len(tc.nodes) <= i {
		tc.nodes = append(tc.nodes, nil)
		tc.cfgs = append(tc.cfgs, Config{})
	}
	tc.cfgs[i] = tc.config(i, tc.key)
	n, err := Start(tc.cfgs[i])
	if err != nil {
		tc.t.Fatal(err)
	}
	tc.t.Cleanup(func() { n.Close() })
	tc.nodes[i] = n
	if err := n.StartRaft(tc.cfgs[i].BindAddr); err != nil {
		tc.t.Fatal(err)
	}
	if err := n.SetMeta(meta); err != nil {
		tc.t.Fatal(err)
	}
	if _, err := n.Join([]string{tc.gossipAddr(0)}); err != nil {
		tc.t.Fatal(err)
	}
	return n
}

// waitRefused waits until newcomer n heard from the leader why it is not
// admitted, and checks that no machine's facts hold it.
func (tc *testCluster) waitRefused(n *Node, id string, want string) {
	tc.t.Helper()
	testpoll.Until(tc.t, 15*time.Second, "the refusal told to "+id, func() error {
		if got := n.JoinRefusal(); !strings.Contains(got, want) {
			return fmt.Errorf("refusal %q, want it to say %q", got, want)
		}
		return nil
	})
	for i := 0; i < 2; i++ {
		tc.nodes[i].Read(func(s *fsm.State) {
			if _, ok := s.Machine(id); ok {
				tc.t.Errorf("m%d's facts hold the refused machine %s", i+1, id)
			}
		})
		if st, _ := tc.nodes[i].Status(); strings.Contains(fmt.Sprint(st.Servers), id) {
			tc.t.Errorf("m%d's Raft configuration holds the refused machine %s", i+1, id)
		}
	}
}

// TestAdmissionNeedsAJoinGrant: gossip with the cluster key is not
// membership. A machine is registered (and taken into Raft) only with a
// usable join grant whose secret it proves, bound to its own id and key;
// a refused machine hears why; a removed machine never comes back.
func TestAdmissionNeedsAJoinGrant(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(2)
	tc.waitVoters(1, 1) // two machines: one voter (never two)
	ctx := ctxTimeout(t, 60*time.Second)
	issue := func(id string, ttl time.Duration, singleUse bool) fsm.JoinGrant {
		g := fsm.JoinGrant{ID: id, Secret: newKey(t), IssuedBy: "test", ExpiresAt: time.Now().Add(ttl), SingleUse: singleUse}
		if _, err := tc.nodes[1].Apply(ctx, fsm.IssueJoinGrant{Grant: g, At: time.Now()}); err != nil {
			t.Fatal(err)
		}
		return g
	}
	prove := func(g fsm.JoinGrant, id, key string) func(*Meta) {
		return func(m *Meta) {
			m.WGPublicKey = key
			p := JoinProofFor(g.ID, g.Secret, id, key)
			m.Join = &p
		}
	}

	// The cluster key alone: gossip yes, membership no.
	keyOnly := tc.startNewcomer(2, func(m *Meta) { m.WGPublicKey = "key-3" })
	tc.waitRefused(keyOnly, "id-m3", "no join token")
	if !strings.Contains(tc.logs[tc.leader()].String(), "refused to admit a machine") {
		t.Error("the leader's log does not name the refused machine")
	}
	tc.stop(2)

	// A proof made for another machine's id (a replayed proof) is refused.
	once := issue("once", time.Hour, true)
	replayed := tc.startNewcomer(3, prove(once, "id-someone-else", "key-4"))
	tc.waitRefused(replayed, "id-m4", "does not match")
	tc.stop(3)

	// The right proof admits; the single-use grant admits no second machine.
	tc.startNewcomer(4, prove(once, "id-m5", "key-5"))
	tc.waitFacts("m5 registered with its grant", func(s *fsm.State) error {
		if _, ok := s.Machine("id-m5"); !ok {
			return fmt.Errorf("m5 not registered")
		}
		if g, _ := s.JoinGrant("once"); len(g.UsedBy) != 1 {
			return fmt.Errorf("grant used by %v", g.UsedBy)
		}
		return nil
	})
	second := tc.startNewcomer(5, prove(once, "id-m6", "key-6"))
	tc.waitRefused(second, "id-m6", "single-use")
	tc.stop(5)

	// An expired grant is refused with its expiry.
	short := issue("short", time.Second, false)
	time.Sleep(1100 * time.Millisecond)
	late := tc.startNewcomer(6, prove(short, "id-m7", "key-7"))
	tc.waitRefused(late, "id-m7", "expired at")
	tc.stop(6)

	// A removed machine is not admitted again, even with a good grant.
	tc.stop(4)
	if err := tc.nodes[0].RemoveServer(ctx, "id-m5"); err != nil {
		t.Fatal(err)
	}
	if _, err := tc.nodes[0].Apply(ctx, fsm.RemoveMachine{ID: "id-m5", At: time.Now()}); err != nil {
		t.Fatal(err)
	}
	fresh := issue("fresh", time.Hour, false)
	back := tc.startNewcomer(4, prove(fresh, "id-m5", "key-5"))
	tc.waitRefused(back, "id-m5", "was removed")
}

// A machine the facts no longer hold loses its Raft seat to the leader's
// reconcile, even while it runs and gossips: a round racing `machine rm`
// may have put it back after RemoveServer.
func TestTheLeaderTakesARemovedMachineOutOfRaft(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(4)
	tc.waitVoters(3, 1)
	removed := tc.withRole(RoleNonvoter)
	id := tc.cfgs[removed].MachineID
	ctx := ctxTimeout(t, 10*time.Second)
	if _, err := tc.nodes[tc.leader()].Apply(ctx, fsm.RemoveMachine{ID: id, At: time.Now()}); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 15*time.Second, id+" out of every Raft configuration", func() error {
		for i, n := range tc.nodes {
			if i == removed {
				continue
			}
			st, err := n.Status()
			if err != nil {
				return err
			}
			for _, s := range st.Servers {
				if s.ID == id {
					return fmt.Errorf("m%d's configuration holds %s", i+1, id)
				}
			}
		}
		return nil
	})
}
