package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/hashicorp/raft"
)

// Machines beyond the Raft servers follow the facts from a server over
// one long RPC stream (see DESIGN.md, "Servers and observers"): a frame
// is a kind byte, a big-endian uint32 length and the payload.
const (
	frameEntry    byte = 1 // big-endian uint64 index, then the command as Raft carries it
	frameSnapshot byte = 2 // big-endian uint64 index, then the facts in fsm's snapshot format
	frameStatus   byte = 3 // JSON followStatus
)

const (
	rpcFollowPath = "/rpc/v1/facts/follow"
	// followKeepalive is how often a server tells its followers its
	// status when no command comes: what their freshness rests on.
	followKeepalive = time.Second
	// followSilence is how long a follower waits for a frame before it
	// drops the server for another.
	followSilence = 4 * followKeepalive
	// maxEntryFrame and maxSnapshotFrame bound what a follower reads.
	maxEntryFrame    = MaxCommandBytes + 8
	maxSnapshotFrame = 256 << 20
	maxStatusFrame   = 64 << 10
	// followWriteTimeout bounds one write to a follower that stopped
	// reading.
	followWriteTimeout = 10 * time.Second
)

// followStatus is what a server tells its followers with every
// keepalive: who leads, the Raft configuration, and whether its own facts
// are current.
type followStatus struct {
	ServerID   string   `json:"server"`
	LeaderID   string   `json:"leader,omitempty"`
	LeaderAddr string   `json:"leader_addr,omitempty"`
	Term       uint64   `json:"term"`
	CommitIdx  uint64   `json:"commit_index"`
	FactsIndex uint64   `json:"facts_index"`
	Servers    []Server `json:"servers"`
	// Stale is the server's own freshness: facts a follower gets from a
	// server cut off from its leader are no fresher than the server's.
	Stale string `json:"stale,omitempty"`
}

// followed is what an observer last heard from the server it follows.
type followed struct {
	status followStatus
	at     time.Time // when the last frame came
}

// handleFollow streams this server's facts to a machine that follows
// them: the commands after the index it has (or a snapshot when the
// journal does not reach back that far), then each command as it
// applies, and a status frame every followKeepalive.
func (n *Node) handleFollow(w http.ResponseWriter, r *http.Request) {
	if n.rs.Load() == nil {
		http.Error(w, "this machine is not a Raft server", http.StatusServiceUnavailable)
		return
	}
	after, err := strconv.ParseUint(r.URL.Query().Get("after"), 10, 64)
	if err != nil {
		http.Error(w, fmt.Sprintf("query parameter after: %v", err), http.StatusBadRequest)
		return
	}
	if n.cfg.Device != "" {
		// Only a registered machine follows the facts (a peer of the mesh
		// is one; this holds should the mesh ever admit more).
		if id, ok := n.CallerOf(r); !ok {
			http.Error(w, fmt.Sprintf("%s is no registered machine", r.RemoteAddr), http.StatusForbidden)
			return
		} else if id == n.cfg.MachineID {
			http.Error(w, "a machine does not follow its own facts", http.StatusBadRequest)
			return
		}
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 64<<10)
	tick := time.NewTicker(followKeepalive)
	defer tick.Stop()
	sendStatus := true
	for {
		changed := n.facts.appliedChanged()
		entries, snap, snapIndex, err := n.facts.followFrom(after)
		if err != nil {
			return
		}
		_ = rc.SetWriteDeadline(time.Now().Add(followWriteTimeout))
		if snap != nil {
			var buf bytes.Buffer
			buf.Write(binary.BigEndian.AppendUint64(nil, snapIndex))
			if err := snap.WriteSnapshot(&buf); err != nil {
				n.logger.Error("writing the facts for a follower", "err", err)
				return
			}
			if err := writeFrame(bw, frameSnapshot, buf.Bytes()); err != nil {
				return
			}
			after = snapIndex
		}
		for _, e := range entries {
			if err := writeFrame(bw, frameEntry, append(binary.BigEndian.AppendUint64(nil, e.index), e.data...)); err != nil {
				return
			}
			after = e.index
		}
		if sendStatus {
			b, err := json.Marshal(n.cachedFollowStatus())
			if err != nil || writeFrame(bw, frameStatus, b) != nil {
				return
			}
			sendStatus = false
		}
		if bw.Flush() != nil || rc.Flush() != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-n.ctx.Done():
			return
		case <-changed:
		case <-tick.C:
			sendStatus = true
		}
	}
}

// cachedFollowStatus is followStatus, computed at most every
// statusCacheFor for all the followers of this server.
func (n *Node) cachedFollowStatus() followStatus {
	if c := n.statusCache.Load(); c != nil && time.Since(c.at) < statusCacheFor {
		return c.status
	}
	st := n.followStatus()
	n.statusCache.Store(&followed{status: st, at: time.Now()})
	return st
}

// statusCacheFor is how long one status serves every follower.
const statusCacheFor = 200 * time.Millisecond

// followStatus is this server's status as its followers get it.
func (n *Node) followStatus() followStatus {
	out := followStatus{ServerID: n.cfg.MachineID, FactsIndex: n.FactsIndex()}
	if st, err := n.Status(); err == nil {
		out.LeaderID, out.LeaderAddr, out.Term, out.CommitIdx, out.Servers = st.LeaderID, st.LeaderAddr, st.Term, st.CommitIndex, st.Servers
	}
	if f := n.Freshness(); f.Stale {
		out.Stale = f.Reason
	}
	return out
}

func writeFrame(w io.Writer, kind byte, payload []byte) error {
	head := [5]byte{kind}
	binary.BigEndian.PutUint32(head[1:], uint32(len(payload)))
	if _, err := w.Write(head[:]); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

// errBadFrame marks a stream that breaks the framing or its bounds.
var errBadFrame = errors.New("bad frame in the facts stream")

// readFrame reads one frame, refusing a kind it does not know and a
// payload over its kind's bound.
func readFrame(r io.Reader) (byte, []byte, error) {
	var head [5]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, nil, err
	}
	size := binary.BigEndian.Uint32(head[1:])
	var limit uint32
	switch head[0] {
	case frameEntry:
		limit = maxEntryFrame
	case frameSnapshot:
		limit = maxSnapshotFrame
	case frameStatus:
		limit = maxStatusFrame
	default:
		return 0, nil, fmt.Errorf("%w: kind %d", errBadFrame, head[0])
	}
	if size > limit {
		return 0, nil, fmt.Errorf("%w: kind %d of %d bytes, over its limit of %d", errBadFrame, head[0], size, limit)
	}
	if (head[0] == frameEntry || head[0] == frameSnapshot) && size < 8 {
		return 0, nil, fmt.Errorf("%w: kind %d of %d bytes has no index", errBadFrame, head[0], size)
	}
	payload := make([]byte, size)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, fmt.Errorf("%w: truncated: %v", errBadFrame, err)
	}
	return head[0], payload, nil
}

// follow keeps this machine's facts in step with a Raft server's until
// the node closes or this machine's own Raft has caught up with them. It
// follows one server at a time, picked by this machine's id among the
// servers that do not lead, and moves on when one fails or falls silent.
func (n *Node) follow() {
	defer n.wg.Done()
	failedAt := map[string]time.Time{}
	var lastErr string
	backoff := 100 * time.Millisecond
	for n.ctx.Err() == nil {
		if n.raftCaughtUp() {
			n.logger.Info("this machine's Raft has the facts: it no longer follows them from a server")
			n.observer.Store(false)
			n.following.Store(nil)
			n.facts.wake()
			return
		}
		id := n.pickServer(failedAt)
		var err error
		if id == "" {
			err = errors.New("no Raft server known to follow")
		} else {
			err = n.followServer(id)
			failedAt[id] = time.Now()
		}
		if err != nil && err.Error() != lastErr && n.ctx.Err() == nil {
			n.logger.Warn("following the facts", "server", id, "err", err)
			lastErr = err.Error()
		}
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
		if err == nil {
			backoff = 100 * time.Millisecond
		}
	}
}

// raftCaughtUp tells whether Raft runs here and has handed the fact store
// everything it holds.
func (n *Node) raftCaughtUp() bool {
	p := n.rs.Load()
	if p == nil {
		return false
	}
	_, leader := p.raft.LeaderWithID()
	return leader != "" && n.facts.fromRaft.Load() >= n.facts.applied.Load()
}

// pickServer chooses the server to follow: among the servers of the last
// configuration heard (else gossip members that run Raft), those that do
// not lead and did not fail in the last seconds, the one this machine's
// id hashes to — followers spread over the servers, and the leader keeps
// its work for Raft.
func (n *Node) pickServer(failedAt map[string]time.Time) string {
	var ids []string
	leader := ""
	if f := n.following.Load(); f != nil {
		leader = f.status.LeaderID
		for _, s := range f.status.Servers {
			ids = append(ids, s.ID)
		}
	}
	if len(ids) == 0 {
		for _, m := range n.gossip.snapshot() {
			if m.Liveness == LivenessAlive && !m.Observer && m.RaftAddr != "" && m.RPCAddr != "" {
				ids = append(ids, m.MachineID)
			}
		}
	}
	ids = slices.DeleteFunc(ids, func(id string) bool { return id == n.cfg.MachineID })
	slices.Sort(ids)
	fresh := slices.DeleteFunc(slices.Clone(ids), func(id string) bool {
		return time.Since(failedAt[id]) < 5*time.Second
	})
	if len(fresh) > 0 {
		ids = fresh
	}
	if others := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return id == leader }); len(others) > 0 {
		ids = others
	}
	if len(ids) == 0 {
		return ""
	}
	h := fnv.New32a()
	h.Write([]byte(n.cfg.MachineID))
	return ids[int(h.Sum32()%uint32(len(ids)))]
}

// followServer follows one server's facts until the stream ends, falls
// silent for followSilence, or this machine's Raft has caught up.
func (n *Node) followServer(id string) error {
	addr := n.rpcAddrOf(id)
	if addr == "" {
		return fmt.Errorf("no RPC address known for server %s", id)
	}
	ctx, cancel := context.WithCancel(n.ctx)
	defer cancel()
	silence := time.AfterFunc(followSilence, cancel)
	defer silence.Stop()
	resp, err := n.rpc.stream(ctx, addr, fmt.Sprintf("%s?after=%d", rpcFollowPath, n.FactsIndex()))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	for {
		kind, payload, err := readFrame(br)
		if err != nil {
			if ctx.Err() != nil && n.ctx.Err() == nil {
				return fmt.Errorf("server %s sent nothing for %s", id, followSilence)
			}
			return fmt.Errorf("reading the facts from server %s: %w", id, err)
		}
		silence.Reset(followSilence)
		switch kind {
		case frameEntry:
			index := binary.BigEndian.Uint64(payload)
			if res := n.facts.applyEntry(index, payload[8:]); res.Fatal != "" {
				return fmt.Errorf("%w: %s", ErrHalted, res.Fatal)
			}
		case frameSnapshot:
			st, err := fsm.ReadSnapshot(bytes.NewReader(payload[8:]))
			if err != nil {
				return fmt.Errorf("the facts from server %s: %w", id, err)
			}
			n.facts.restoreFollowed(binary.BigEndian.Uint64(payload), st)
		case frameStatus:
			var st followStatus
			if err := json.Unmarshal(payload, &st); err != nil {
				return fmt.Errorf("%w: status from server %s: %v", errBadFrame, id, err)
			}
			st.ServerID = id
			n.following.Store(&followed{status: st, at: time.Now()})
			if err := n.serveIfChosen(st); err != nil {
				return err
			}
			if n.raftCaughtUp() {
				return nil
			}
			if n.shouldMove(st) {
				return nil // to a server that does not lead
			}
		}
		if f := n.following.Load(); f != nil && kind != frameStatus {
			n.following.Store(&followed{status: f.status, at: time.Now()})
		}
	}
}

// shouldMove tells whether to leave the server st came from: it leads
// (or it is no longer a server) while a server that does not lead could
// take this machine.
func (n *Node) shouldMove(st followStatus) bool {
	server := slices.ContainsFunc(st.Servers, func(s Server) bool { return s.ID == st.ServerID })
	if server && st.LeaderID != st.ServerID {
		return false
	}
	return slices.ContainsFunc(st.Servers, func(s Server) bool {
		return s.ID != st.LeaderID && s.ID != st.ServerID && s.ID != n.cfg.MachineID
	})
}

// serveIfChosen starts Raft on this machine once the leader has made it
// a server: the configuration names it.
func (n *Node) serveIfChosen(st followStatus) error {
	if n.rs.Load() != nil || !slices.ContainsFunc(st.Servers, func(s Server) bool { return s.ID == n.cfg.MachineID }) {
		return nil
	}
	n.logger.Info("the leader made this machine a Raft server: starting Raft")
	if err := n.startRaftServer(); err != nil {
		return fmt.Errorf("starting Raft: %w", err)
	}
	return nil
}

// followFreshness is an observer's freshness: it rests on the last frame
// from its server and on the server's own.
func (n *Node) followFreshness(f *followed) Freshness {
	limit := 3 * n.raftHeartbeat()
	switch {
	case f == nil:
		return Freshness{Stale: true, Reason: "this machine follows the facts and has not heard from a server yet"}
	case f.status.LeaderID == "":
		return Freshness{Stale: true, Since: f.at, Reason: fmt.Sprintf("the server this machine follows (%s) knows no leader", f.status.ServerID)}
	case f.status.Stale != "":
		return Freshness{Stale: true, Since: f.at, Reason: fmt.Sprintf("the server this machine follows (%s): %s", f.status.ServerID, f.status.Stale)}
	case time.Since(f.at) > max(limit, followSilence):
		return Freshness{Stale: true, Since: f.at, Reason: fmt.Sprintf("this machine has not heard from the server it follows (%s) for over %s", f.status.ServerID, max(limit, followSilence))}
	}
	return Freshness{}
}

// leaderID is the leader as this machine knows it: from Raft on a
// server, from the server it follows on an observer.
func (n *Node) leaderID() string {
	if p := n.rs.Load(); p != nil {
		if _, id := p.raft.LeaderWithID(); id != "" || n.following.Load() == nil {
			return string(id)
		}
	}
	if f := n.following.Load(); f != nil {
		return f.status.LeaderID
	}
	return ""
}

// leading tells whether this machine leads Raft now.
func (n *Node) leading() bool {
	p := n.rs.Load()
	return p != nil && p.raft.State() == raft.Leader
}

// observing tells whether this machine follows the facts from a server
// (it is not a Raft server, or its Raft has not caught up yet).
func (n *Node) observing() bool { return n.observer.Load() && !n.raftCaughtUp() }
