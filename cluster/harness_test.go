package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/testpoll"
)

// testTiming makes failure detection and promotion quick on loopback.
var testTiming = Timing{
	GossipProbeInterval: 200 * time.Millisecond,
	RaftHeartbeat:       300 * time.Millisecond,
	StabilizationTime:   500 * time.Millisecond,
	DeadServerAfter:     2 * time.Second,
	ReconcileInterval:   200 * time.Millisecond,
	ReconnectInterval:   500 * time.Millisecond,
}

// syncBuffer is a log sink tests can read while nodes write to it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testCluster is a set of in-process nodes, each on its own loopback
// address (127.0.1.N) with the default ports, so they talk over real TCP
// and UDP exactly as separate machines would.
type testCluster struct {
	t     *testing.T
	key   []byte
	nodes []*Node
	cfgs  []Config
	logs  []*syncBuffer
	grant fsm.JoinGrant // the join grant newcomers present
}

func newKey(t *testing.T) []byte {
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	return key
}

func newTestCluster(t *testing.T) *testCluster {
	tc := &testCluster{t: t, key: newKey(t)}
	t.Cleanup(func() {
		for _, n := range tc.nodes {
			if n != nil {
				n.Close()
			}
		}
		if t.Failed() {
			for i, l := range tc.logs {
				t.Logf("--- log of m%d ---\n%s", i+1, l.String())
			}
		}
	})
	return tc
}

func (tc *testCluster) config(i int, key []byte) Config {
	buf := &syncBuffer{}
	tc.logs = append(tc.logs, buf)
	return Config{
		MachineID: fmt.Sprintf("id-m%d", i+1),
		Name:      fmt.Sprintf("m%d", i+1),
		DataDir:   filepath.Join(tc.t.TempDir(), "data"),
		BindAddr:  netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}),
		Key:       key,
		Timing:    testTiming,
		Logger:    slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

// start launches node i; node 0 bootstraps, the others join it.
func (tc *testCluster) start(i int) *Node {
	tc.t.Helper()
	for len(tc.nodes) <= i {
		tc.nodes = append(tc.nodes, nil)
		tc.cfgs = append(tc.cfgs, Config{})
	}
	if tc.cfgs[i].MachineID == "" {
		tc.cfgs[i] = tc.config(i, tc.key)
	}
	n, err := Start(tc.cfgs[i])
	if err != nil {
		tc.t.Fatalf("starting m%d: %v", i+1, err)
	}
	// Registered after the node's data dir: cleanups run last first, so
	// the node is closed before its directory is removed (a node still
	// writing peers.json made that removal fail).
	tc.t.Cleanup(func() { n.Close() })
	tc.nodes[i] = n
	if err := n.StartRaft(tc.cfgs[i].BindAddr); err != nil {
		tc.t.Fatalf("starting raft on m%d: %v", i+1, err)
	}
	if i == 0 {
		if _, err := n.Bootstrap(); err != nil {
			tc.t.Fatalf("bootstrap: %v", err)
		}
	}
	if joined, _ := n.RejoinKnown(); joined == 0 && i > 0 {
		tc.presentGrant(n)
		if _, err := n.Join([]string{tc.gossipAddr(0)}); err != nil {
			tc.t.Fatalf("m%d joining: %v", i+1, err)
		}
	}
	return n
}

// presentGrant makes newcomer n prove it holds the test cluster's join
// grant, issued through the first running node the first time.
func (tc *testCluster) presentGrant(n *Node) {
	tc.t.Helper()
	if tc.grant.ID == "" {
		tc.grant = fsm.JoinGrant{ID: "test-grant", Secret: newKey(tc.t), IssuedBy: "test", ExpiresAt: time.Now().Add(time.Hour)}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := tc.nodes[0].Apply(ctx, fsm.IssueJoinGrant{Grant: tc.grant, At: time.Now()}); err != nil {
			tc.t.Fatalf("issuing the join grant: %v", err)
		}
	}
	meta := n.LocalMeta()
	proof := JoinProofFor(tc.grant.ID, tc.grant.Secret, meta.MachineID, meta.WGPublicKey)
	if err := n.SetMeta(func(m *Meta) { m.Join = &proof }); err != nil {
		tc.t.Fatal(err)
	}
}

func (tc *testCluster) gossipAddr(i int) string {
	return netip.AddrPortFrom(tc.cfgs[i].BindAddr, DefaultGossipPort).String()
}

// stop closes node i without leaving: to the others it looks crashed.
func (tc *testCluster) stop(i int) {
	tc.nodes[i].Close()
	tc.nodes[i] = nil
}

func (tc *testCluster) startN(n int) {
	for i := 0; i < n; i++ {
		tc.start(i)
	}
}

// waitVoters waits until every running node sees the wanted numbers of
// voters and non-voters and agrees on one leader.
func (tc *testCluster) waitVoters(voters, nonvoters int) {
	tc.t.Helper()
	testpoll.Until(tc.t, 30*time.Second, fmt.Sprintf("%d voters and %d non-voters", voters, nonvoters), func() error {
		leaders := map[string]bool{}
		for i, n := range tc.nodes {
			if n == nil {
				continue
			}
			st, err := n.Status()
			if err != nil {
				return err
			}
			v, nv := 0, 0
			for _, s := range st.Servers {
				if s.Voter {
					v++
				} else {
					nv++
				}
			}
			if v != voters || nv != nonvoters {
				return fmt.Errorf("m%d sees %d voters, %d non-voters", i+1, v, nv)
			}
			if st.LeaderID == "" {
				return fmt.Errorf("m%d knows no leader", i+1)
			}
			leaders[st.LeaderID] = true
		}
		if len(leaders) != 1 {
			return fmt.Errorf("machines disagree on the leader: %v", leaders)
		}
		return nil
	})
}

func (tc *testCluster) leader() int {
	tc.t.Helper()
	return tc.withRole(RoleLeader)
}

// withRole is the index of the first running node whose Raft role is
// role; the test fails when there is none.
func (tc *testCluster) withRole(role string) int {
	tc.t.Helper()
	for i, n := range tc.nodes {
		if n == nil {
			continue
		}
		if st, err := n.Status(); err == nil && st.Role == role {
			return i
		}
	}
	tc.t.Fatalf("no running machine is %s", role)
	return -1
}

// waitFacts waits until every running node's facts satisfy check.
func (tc *testCluster) waitFacts(what string, check func(*fsm.State) error) {
	tc.t.Helper()
	testpoll.Until(tc.t, 20*time.Second, what, func() error {
		for i, n := range tc.nodes {
			if n == nil {
				continue
			}
			var err error
			n.Read(func(s *fsm.State) { err = check(s) })
			if err != nil {
				return fmt.Errorf("m%d: %w", i+1, err)
			}
		}
		return nil
	})
}

func machinesRegistered(want int) func(*fsm.State) error {
	return func(s *fsm.State) error {
		if got := len(s.Machines()); got != want {
			return fmt.Errorf("%d machines registered, want %d", got, want)
		}
		return nil
	}
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
