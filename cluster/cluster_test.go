package cluster

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/testpoll"
)

func TestThreeMachinesFormClusterAndForwardCommands(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	tc.waitFacts("3 machines registered", machinesRegistered(3))

	// A command sent to a follower is forwarded to the leader and applied
	// on every machine.
	follower := (tc.leader() + 1) % 3
	_, err := tc.nodes[follower].Apply(ctxTimeout(t, 10*time.Second), fsm.AcquireLock{
		Namespace: "web", Holder: "m-follower/deploy", Lease: time.Minute, At: time.Now(),
	})
	if err != nil {
		t.Fatalf("apply through follower: %v", err)
	}
	// Read-your-writes on the proposer, without waiting.
	var held bool
	tc.nodes[follower].Read(func(s *fsm.State) { _, held = s.Lock("web") })
	if !held {
		t.Fatal("the proposing follower does not see its own command on return")
	}
	tc.waitFacts("lock replicated", func(s *fsm.State) error {
		if l, ok := s.Lock("web"); !ok || l.Holder != "m-follower/deploy" {
			return fmt.Errorf("lock is %+v, %v", l, ok)
		}
		return nil
	})

	// A command over the limit is refused on the proposer, naming the
	// limit, and the store goes on committing: nothing cut is committed.
	big := fsm.ServiceSpec{Name: "big", Image: "img", Env: map[string]string{"PAD": strings.Repeat("x", MaxCommandBytes)}}
	_, err = tc.nodes[follower].Apply(ctxTimeout(t, 10*time.Second), fsm.PutService{Namespace: "web", Holder: "m-follower/deploy", Spec: big, At: time.Now()})
	if !errors.Is(err, ErrCommandTooLarge) || !strings.Contains(err.Error(), "PutService") || !strings.Contains(err.Error(), "512 KiB") {
		t.Fatalf("oversized command: %v", err)
	}
	if _, err := tc.nodes[follower].Apply(ctxTimeout(t, 10*time.Second), fsm.ReleaseLock{Namespace: "web", Holder: "m-follower/deploy", At: time.Now()}); err != nil {
		t.Fatalf("the store stopped committing after an oversized command: %v", err)
	}
}

func TestFiveMachinesHaveFiveVoters(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(4)
	tc.waitVoters(3, 1) // 4 machines: 3 voters, the rest non-voters
	tc.start(4)
	tc.waitVoters(5, 0)
	tc.waitFacts("5 machines registered", machinesRegistered(5))
}

func TestLeaderKilledNewLeaderServes(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	old := tc.leader()
	oldID := tc.cfgs[old].MachineID
	tc.stop(old)

	var survivor int
	testpoll.Until(t, 20*time.Second, "a new leader", func() error {
		for i, n := range tc.nodes {
			if n == nil {
				continue
			}
			st, _ := n.Status()
			if st.LeaderID == "" || st.LeaderID == oldID {
				return fmt.Errorf("m%d sees leader %q", i+1, st.LeaderID)
			}
			survivor = i
		}
		return nil
	})
	_, err := tc.nodes[survivor].Apply(ctxTimeout(t, 10*time.Second), fsm.AcquireLock{
		Namespace: "after-failover", Holder: "x", Lease: time.Minute, At: time.Now(),
	})
	if err != nil {
		t.Fatalf("apply after failover: %v", err)
	}
	tc.waitFacts("lock after failover", func(s *fsm.State) error {
		if _, ok := s.Lock("after-failover"); !ok {
			return errors.New("lock missing")
		}
		return nil
	})
}

func TestRestartedMachineKeepsStateFromDisk(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	if _, err := tc.nodes[0].Apply(ctxTimeout(t, 10*time.Second), fsm.AcquireLock{
		Namespace: "kept", Holder: "h", Lease: time.Hour, At: time.Now(),
	}); err != nil {
		t.Fatal(err)
	}
	tc.waitFacts("lock replicated", func(s *fsm.State) error {
		if _, ok := s.Lock("kept"); !ok {
			return errors.New("lock missing")
		}
		return nil
	})
	victim := (tc.leader() + 1) % 3
	tc.stop(victim)
	// Commands while it is down reach it from the log after it returns.
	if _, err := tc.nodes[tc.leader()].Apply(ctxTimeout(t, 10*time.Second), fsm.AcquireLock{
		Namespace: "while-down", Holder: "h", Lease: time.Hour, At: time.Now(),
	}); err != nil {
		t.Fatal(err)
	}
	n := tc.start(victim) // same id, data dir and address; rejoins via its known peers
	testpoll.Until(t, 20*time.Second, "restarted machine catches up", func() error {
		var err error
		n.Read(func(s *fsm.State) {
			_, a := s.Lock("kept")
			_, b := s.Lock("while-down")
			if !a || !b || len(s.Machines()) != 3 {
				err = fmt.Errorf("kept=%v while-down=%v machines=%d", a, b, len(s.Machines()))
			}
		})
		return err
	})
	tc.waitVoters(3, 0)
	if got := len(n.Members()); got != 3 {
		t.Fatalf("restarted machine sees %d gossip members, want 3", got)
	}
}

func TestWrongClusterKeyIsRefused(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(2)
	tc.waitVoters(1, 1) // two machines: one voter (never two)

	tc.nodes = append(tc.nodes, nil)
	tc.cfgs = append(tc.cfgs, tc.config(2, newKey(t)))
	intruder, err := Start(tc.cfgs[2])
	if err != nil {
		t.Fatal(err)
	}
	tc.nodes[2] = intruder
	_, err = intruder.Join([]string{tc.gossipAddr(0)})
	if !errors.Is(err, ErrKeyRefused) {
		t.Fatalf("join with the wrong key: got %v, want ErrKeyRefused", err)
	}
	time.Sleep(time.Second) // give gossip time to (wrongly) spread it
	for i := 0; i < 2; i++ {
		for _, m := range tc.nodes[i].Members() {
			if m.MachineID == tc.cfgs[2].MachineID {
				t.Fatalf("m%d lists the machine with the wrong key", i+1)
			}
		}
	}
	if !strings.Contains(tc.logs[0].String(), "cluster key differs") {
		t.Errorf("m1's log does not explain the refused machine:\n%s", tc.logs[0].String())
	}
}

func TestMissingKeyIsAnError(t *testing.T) {
	tc := newTestCluster(t)
	cfg := tc.config(0, nil)
	if _, err := Start(cfg); !errors.Is(err, ErrNoKey) {
		t.Fatalf("start without key: got %v, want ErrNoKey", err)
	}
}

func TestLockRefusedToOtherHolderThenExpires(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	ctx := ctxTimeout(t, 20*time.Second)
	if _, err := tc.nodes[0].Apply(ctx, fsm.AcquireLock{Namespace: "db", Holder: "alice", Lease: 2 * time.Second, At: time.Now()}); err != nil {
		t.Fatal(err)
	}
	_, err := tc.nodes[1].Apply(ctx, fsm.AcquireLock{Namespace: "db", Holder: "bob", Lease: time.Minute, At: time.Now()})
	var rule *fsm.RuleError
	if !errors.Is(err, fsm.ErrLockHeld) || !errors.As(err, &rule) || rule.Holder != "alice" {
		t.Fatalf("second holder: got %v, want lock held by alice", err)
	}
	// The leader expires the lease without anyone asking.
	tc.waitFacts("lock expired", func(s *fsm.State) error {
		if l, ok := s.Lock("db"); ok {
			return fmt.Errorf("still held by %s", l.Holder)
		}
		return nil
	})
	if _, err := tc.nodes[2].Apply(ctx, fsm.AcquireLock{Namespace: "db", Holder: "bob", Lease: time.Minute, At: time.Now()}); err != nil {
		t.Fatalf("bob after expiry: %v", err)
	}
}

func TestGoneVoterIsReplacedByNonvoter(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(4)
	tc.waitVoters(3, 1)
	// Kill a voter that does not lead, so quorum stays.
	st, _ := tc.nodes[0].Status()
	var victim = -1
	for _, s := range st.Servers {
		if s.Voter && !s.Leader {
			fmt.Sscanf(s.ID, "id-m%d", &victim)
			victim--
			break
		}
	}
	tc.stop(victim)
	testpoll.Until(t, 30*time.Second, "non-voter promoted in place of the gone voter", func() error {
		st, err := tc.nodes[tc.leader()].Status()
		if err != nil {
			return err
		}
		voters := 0
		for _, s := range st.Servers {
			if s.Voter && s.ID != tc.cfgs[victim].MachineID {
				voters++
			}
			if s.Voter && s.ID == tc.cfgs[victim].MachineID {
				return errors.New("gone machine is still a voter")
			}
		}
		if voters != 3 {
			return fmt.Errorf("%d live voters", voters)
		}
		return nil
	})
}

func TestLeaderLeavesCleanly(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	old := tc.leader()
	oldID := tc.cfgs[old].MachineID
	if err := tc.nodes[old].Leave(5 * time.Second); err != nil {
		t.Fatalf("leave: %v", err)
	}
	// Leadership was handed over before leaving, not lost to a timeout.
	var next *Node
	for i, n := range tc.nodes {
		if i != old {
			next = n
		}
	}
	st, _ := next.Status()
	if st.LeaderID == "" || st.LeaderID == oldID {
		t.Fatalf("after leave the leader is %q", st.LeaderID)
	}
	tc.stop(old)
	testpoll.Until(t, 10*time.Second, "the others record it as left", func() error {
		m, ok := next.Member(oldID)
		if !ok || m.Liveness != LivenessLeft {
			return fmt.Errorf("member %+v", m)
		}
		return nil
	})
}

// A follower that has every fact is caught up even when the leader's log
// ends in entries the fact store never sees (barriers, no-ops), with no
// command coming after them.
func TestFollowerCaughtUpAfterBarriers(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	tc.waitFacts("3 machines registered", machinesRegistered(3))
	leader := tc.nodes[tc.leader()]
	follower := tc.nodes[(tc.leader()+1)%3]
	if _, err := leader.Apply(ctxTimeout(t, 10*time.Second), fsm.Probe{Machine: "id-m1", Seq: 1, At: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := leader.CaughtUp(ctxTimeout(t, 10*time.Second)); err != nil { // a barrier on the leader
			t.Fatal(err)
		}
	}
	if err := follower.CaughtUp(ctxTimeout(t, 3*time.Second)); err != nil {
		t.Fatalf("follower with every fact not caught up: %v", err)
	}
}

// A machine's WireGuard key is bound when it is registered: gossip that
// claims the machine with another key is refused by the leader, logged,
// and changes neither its fact nor where it is called.
func TestGossipClaimWithAnotherKeyIsRefused(t *testing.T) {
	tc := newTestCluster(t)
	tc.startN(3)
	tc.waitVoters(3, 0)
	follower := (tc.leader() + 1) % 3
	id := tc.cfgs[follower].MachineID
	rpcAddr := func() string { return tc.nodes[tc.leader()].rpcAddrOf(id) }
	if err := tc.nodes[follower].SetMeta(func(m *Meta) { m.WGPublicKey = "registered-key" }); err != nil {
		t.Fatal(err)
	}
	keyIs := func(want string) func(*fsm.State) error {
		return func(s *fsm.State) error {
			if m, _ := s.Machine(id); m.WGPublicKey != want {
				return fmt.Errorf("key %q, want %q", m.WGPublicKey, want)
			}
			return nil
		}
	}
	tc.waitFacts("the key registered", keyIs("registered-key"))
	before := rpcAddr()
	if err := tc.nodes[follower].SetMeta(func(m *Meta) { m.WGPublicKey, m.RPCAddr = "forged-key", "192.0.2.66:7948" }); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 10*time.Second, "the leader to refuse the claim", func() error {
		if !strings.Contains(tc.logs[tc.leader()].String(), "refused gossip claiming a registered machine with another WireGuard key") {
			return errors.New("no refusal logged")
		}
		return nil
	})
	time.Sleep(time.Second) // several reconcile rounds
	tc.waitFacts("the registered key kept", keyIs("registered-key"))
	if got := rpcAddr(); got != before {
		t.Fatalf("calls to the machine go to %s after the forged claim, not %s", got, before)
	}
}
