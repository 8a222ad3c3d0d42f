package cluster

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/testpoll"
)

func lockCmd(t *testing.T, ns, holder string) []byte {
	t.Helper()
	b, err := fsm.Encode(fsm.AcquireLock{Namespace: ns, Holder: holder, Lease: time.Hour, At: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestJournalGivesCommandsOrASnapshot(t *testing.T) {
	f := newFactStore(func(error) {}, nil)
	// Commands at 1, 3, 4 and 7: the indexes between are barriers and
	// configuration entries, which the store never sees.
	for _, idx := range []uint64{1, 3, 4, 7} {
		if res := f.applyEntry(idx, lockCmd(t, fmt.Sprintf("ns%d", idx), "a")); res.Fatal != "" || res.Rule != nil {
			t.Fatalf("applying %d: %+v", idx, res)
		}
	}
	indexes := func(es []journalEntry) (out []uint64) {
		for _, e := range es {
			out = append(out, e.index)
		}
		return out
	}
	for _, tc := range []struct {
		after uint64
		want  string
	}{
		{0, "[1 3 4 7]"},
		{3, "[4 7]"},
		{5, "[7]"}, // a follower at a barrier's index lacks only what came after
		{7, "[]"},
		{9, "[]"}, // a follower further than this server waits for it
	} {
		entries, snap, _, err := f.followFrom(tc.after)
		if err != nil || snap != nil {
			t.Fatalf("after %d: snapshot %v, err %v", tc.after, snap != nil, err)
		}
		if got := fmt.Sprint(indexes(entries)); got != tc.want {
			t.Fatalf("after %d: entries %s, want %s", tc.after, got, tc.want)
		}
	}

	// An index the store has reached is not applied twice: the lock is
	// held by "a", and "b" would be refused by the rule if it applied.
	if res := f.applyEntry(4, lockCmd(t, "ns4", "b")); res.Rule != nil || res.Fatal != "" {
		t.Fatalf("an index already applied was applied again: %+v", res)
	}
	if res := f.applyEntry(8, lockCmd(t, "ns4", "b")); res.Rule == nil {
		t.Fatal("the lock rule did not refuse another holder: the check above proves nothing")
	}

	// Past the journal's bound, a follower that far behind gets the state.
	for i := range journalMaxEntries {
		f.applyEntry(uint64(10+i), lockCmd(t, fmt.Sprintf("bulk%d", i), "a"))
	}
	entries, snap, at, err := f.followFrom(3)
	if err != nil || snap == nil || entries != nil {
		t.Fatalf("a follower behind the journal: entries %d, snapshot %v, err %v", len(entries), snap != nil, err)
	}
	if at != f.applied.Load() {
		t.Fatalf("snapshot at %d, store at %d", at, f.applied.Load())
	}
	if _, held := snap.Lock("ns3"); !held {
		t.Fatal("the snapshot lacks an early command")
	}

	// A follower restores the server's state once, and never goes back.
	g := newFactStore(func(error) {}, nil)
	g.restoreFollowed(at, snap)
	g.restoreFollowed(5, fsm.NewState())
	if g.applied.Load() != at {
		t.Fatalf("follower at %d, want %d", g.applied.Load(), at)
	}
	g.read(func(s *fsm.State) {
		if _, held := s.Lock("ns3"); !held {
			t.Fatal("an older snapshot replaced the follower's newer state")
		}
	})
}

func TestFactsStreamRefusesBadFrames(t *testing.T) {
	frame := func(kind byte, size uint32, payload []byte) []byte {
		b := []byte{kind}
		b = binary.BigEndian.AppendUint32(b, size)
		return append(b, payload...)
	}
	for _, tc := range []struct {
		name string
		raw  []byte
		want string
	}{
		{"unknown kind", frame(9, 0, nil), "kind 9"},
		{"entry over its limit", frame(frameEntry, maxEntryFrame+1, nil), "over its limit"},
		{"status over its limit", frame(frameStatus, maxStatusFrame+1, nil), "over its limit"},
		{"entry without index", frame(frameEntry, 3, []byte{1, 2, 3}), "no index"},
		{"truncated", frame(frameSnapshot, 100, make([]byte, 20)), "truncated"},
	} {
		_, _, err := readFrame(bytes.NewReader(tc.raw))
		if !errors.Is(err, errBadFrame) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	var buf bytes.Buffer
	if err := writeFrame(&buf, frameStatus, []byte(`{"server":"a"}`)); err != nil {
		t.Fatal(err)
	}
	kind, payload, err := readFrame(&buf)
	if err != nil || kind != frameStatus || string(payload) != `{"server":"a"}` {
		t.Fatalf("round trip: %d %q %v", kind, payload, err)
	}
}

// TestMachinesBeyondMaxServersFollowTheFacts runs real Raft and gossip on
// loopback with room for three servers and five machines.
func TestMachinesBeyondMaxServersFollowTheFacts(t *testing.T) {
	tc := newTestCluster(t)
	for i := range 5 {
		tc.cfgs = append(tc.cfgs, tc.config(i, tc.key))
		tc.cfgs[i].MaxServers = 3
		tc.nodes = append(tc.nodes, nil)
	}
	tc.startN(5)
	tc.waitVoters(3, 0)
	tc.waitFacts("5 machines registered", machinesRegistered(5))

	observers := 0
	for i, n := range tc.nodes {
		st, err := n.Status()
		if err != nil {
			t.Fatal(err)
		}
		if st.Role != RoleObserver {
			continue
		}
		observers++
		if st.FollowsServer == "" || st.FollowsServer == st.LeaderID {
			t.Fatalf("m%d follows %q, leader %q: an observer follows a server that does not lead", i+1, st.FollowsServer, st.LeaderID)
		}
		if f := n.Freshness(); f.Stale {
			t.Fatalf("m%d: observer's facts stale: %s", i+1, f.Reason)
		}
	}
	if observers != 2 {
		t.Fatalf("%d observers, want 2", observers)
	}

	// A command from an observer: forwarded to the leader, in the
	// observer's own facts on return, then on every machine.
	obs := tc.observer()
	if _, err := tc.nodes[obs].Apply(ctxTimeout(t, 10*time.Second), fsm.AcquireLock{Namespace: "web", Holder: "obs", Lease: time.Hour, At: time.Now()}); err != nil {
		t.Fatalf("apply through an observer: %v", err)
	}
	var held bool
	tc.nodes[obs].Read(func(s *fsm.State) { _, held = s.Lock("web") })
	if !held {
		t.Fatal("the proposing observer does not see its own command on return")
	}
	tc.waitFacts("the observer's lock everywhere", lockHeld("web", "obs"))
	if err := tc.nodes[obs].CaughtUp(ctxTimeout(t, 10*time.Second)); err != nil {
		t.Fatalf("an observer catching up: %v", err)
	}

	// The follow route asks for the cluster key, and names what is wrong.
	addr := tc.nodes[tc.leader()].net.Load().rpcAddr.String()
	resp, err := http.Get("http://" + addr + rpcFollowPath + "?after=0")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("a raw client without the key got %s", resp.Status)
	}
	_, err = tc.nodes[obs].rpc.stream(ctxTimeout(t, 5*time.Second), addr, rpcFollowPath+"?after=x")
	if err == nil || !strings.Contains(err.Error(), "400") || !strings.Contains(err.Error(), "after") {
		t.Fatalf("a malformed index: %v", err)
	}

	// A server that does not lead dies: the leader makes an observer a
	// server, which starts Raft over the facts it followed and is promoted
	// in place of the dead voter; the other observer goes on following.
	dead := (tc.leader() + 1) % 3
	for i := range 3 {
		if i != tc.leader() && tc.nodes[i].cfg.MachineID == tc.followsOf(obs) {
			dead = i
		}
	}
	tc.stop(dead)
	tc.waitVoters(3, 1) // the dead voter demoted, a new one in its place
	testpoll.Until(t, 30*time.Second, "one observer left, and the new server out of observing", func() error {
		n := 0
		for i, node := range tc.nodes {
			if node == nil {
				continue
			}
			st, err := node.Status()
			if err != nil {
				return fmt.Errorf("m%d: %w", i+1, err)
			}
			if st.Role == RoleObserver {
				n++
			}
		}
		if n != 1 {
			return fmt.Errorf("%d observers", n)
		}
		return nil
	})
	obs = tc.observer()
	if _, err := tc.nodes[obs].Apply(ctxTimeout(t, 10*time.Second), fsm.AcquireLock{Namespace: "api", Holder: "obs2", Lease: time.Hour, At: time.Now()}); err != nil {
		t.Fatalf("apply through the remaining observer: %v", err)
	}
	tc.waitFacts("both locks on every running machine", func(s *fsm.State) error {
		return errors.Join(lockHeld("web", "obs")(s), lockHeld("api", "obs2")(s))
	})
}

func lockHeld(ns, holder string) func(*fsm.State) error {
	return func(s *fsm.State) error {
		if l, ok := s.Lock(ns); !ok || l.Holder != holder {
			return fmt.Errorf("lock %s is %+v, %v", ns, l, ok)
		}
		return nil
	}
}

// observer is the index of a running observer.
func (tc *testCluster) observer() int {
	tc.t.Helper()
	return tc.withRole(RoleObserver)
}

// followsOf is the server node i follows the facts from.
func (tc *testCluster) followsOf(i int) string {
	st, _ := tc.nodes[i].Status()
	return st.FollowsServer
}
