package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/atomicfile"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
)

// Errors a caller of Node may match with errors.Is.
var (
	// ErrNoLeader: no leader could be reached before the context ended.
	ErrNoLeader = errors.New("no Raft leader reachable")
	// ErrNotLeader: this machine is not the leader (internal to forwarding).
	ErrNotLeader = errors.New("this machine is not the Raft leader")
	// ErrRaftNotStarted: the node has gossip but has not joined Raft yet.
	ErrRaftNotStarted = errors.New("raft is not running on this machine yet")
	// ErrUncertain: the command reached the leader but the outcome is
	// unknown (leadership was lost or the connection broke mid-way); it
	// may or may not have been applied.
	ErrUncertain = errors.New("outcome of the command is unknown")
	// ErrCommandTooLarge: a command's encoding is over MaxCommandBytes; it
	// was not proposed.
	ErrCommandTooLarge = errors.New("command too large")
)

// MaxCommandBytes bounds one command's encoding, checked before it is
// proposed on any machine: well under what forwarding carries, so a
// forwarded command is never cut.
const MaxCommandBytes = 512 << 10

// Node is one machine's membership in the cluster: gossip from Start,
// then Raft and RPC from StartRaft. It owns every goroutine it starts;
// Close stops them.
type Node struct {
	cfg    Config
	logger *slog.Logger
	gossip *gossip
	facts  *factStore
	rpc    *rpcClient

	rs     atomic.Pointer[raftParts] // Raft, once this machine is a server
	net    atomic.Pointer[netParts]  // the RPC server, from StartRaft
	stores atomic.Pointer[raftStores]
	// observer is set while this machine follows the facts from a server
	// (follow.go) rather than from its own Raft; following is what it
	// last heard.
	observer   atomic.Bool
	following  atomic.Pointer[followed]
	savedPeers []byte // the known peers last written (watchGossip's)
	// statusCache is the status a server last sent its followers.
	statusCache atomic.Pointer[followed]
	// raftStart serialises starting Raft, and refuses it once Close began.
	raftStart struct {
		sync.Mutex
		closed bool
	}
	rpcMux *http.ServeMux
	nudge  chan struct{} // gossip changed; consumed by the leader's loop
	// committed: a follower waits for what this machine, leading,
	// committed; consumed by announceCommits.
	committed chan struct{}
	// leftLeadership is when this machine last stopped leading (unix ns;
	// zero: never): until then its facts were current.
	leftLeadership atomic.Int64
	halted         chan struct{}
	halt           sync.Once
	haltMu         sync.Mutex
	hErr           error

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed sync.Once

	impostorsMu sync.Mutex
	impostors   map[string]bool   // identity claims refused and logged, by id/key
	refused     map[string]string // admissions refused and logged: the reason, by machine id
}

// raftParts is Raft and its transport, published at once when this
// machine becomes a server.
type raftParts struct {
	raft      *raft.Raft
	transport *raft.NetworkTransport
	raftAddr  netip.AddrPort
}

// raftStores is Raft's log and snapshots on disk, opened by StartRaft:
// whether they hold state decides whether a machine starts as a server.
type raftStores struct {
	store *raftboltdb.BoltStore
	snaps raft.SnapshotStore
	hlog  hclog.Logger
}

// netParts is the RPC server every machine runs from StartRaft on.
type netParts struct {
	http     *http.Server
	self     *http.Client // this machine's calls to itself, in process
	addr     netip.Addr   // the overlay address
	raftAddr netip.AddrPort
	rpcAddr  netip.AddrPort
}

// Start begins gossip on the underlay. The node can join other machines
// right away; it takes part in Raft only after StartRaft.
func Start(cfg Config) (*Node, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &Node{
		cfg:       cfg,
		logger:    cfg.Logger,
		rpcMux:    http.NewServeMux(),
		nudge:     make(chan struct{}, 1),
		committed: make(chan struct{}, 1),
		halted:    make(chan struct{}),
		ctx:       ctx,
		cancel:    cancel,
	}
	n.rpc = newRPCClient(n.token, n.overlaySource)
	n.facts = newFactStore(n.haltOn, cfg.OnChange)
	g, err := startGossip(cfg, Meta{MachineID: cfg.MachineID, Name: cfg.Name, Facts: FactsLevel}, cfg.Logger)
	if err != nil {
		cancel()
		return nil, err
	}
	g.overlays = n.overlayMap
	n.gossip = g
	n.wg.Add(2)
	go n.watchGossip()
	go n.reconnectFailed()
	return n, nil
}

// Join contacts any of the given gossip addresses (host:port).
func (n *Node) Join(addrs []string) (int, error) { return n.gossip.join(addrs) }

// RejoinKnown contacts the machines this node last knew, kept in the data
// dir, so a restarted daemon finds its cluster without flags.
func (n *Node) RejoinKnown() (int, error) {
	addrs, err := n.knownPeers()
	if err != nil || len(addrs) == 0 {
		return 0, err
	}
	return n.gossip.join(addrs)
}

// OverlayIP is this machine's overlay address: from its own facts, else
// as another machine's facts told it over gossip; zero until allocated.
func (n *Node) OverlayIP() netip.Addr {
	var a netip.Addr
	n.facts.read(func(s *fsm.State) {
		if m, ok := s.Machine(n.cfg.MachineID); ok {
			a = m.OverlayIP
		}
	})
	if a.IsValid() {
		return a
	}
	return n.gossip.learnedOverlay()
}

func (n *Node) overlayMap() map[string]string {
	out := map[string]string{}
	n.facts.read(func(s *fsm.State) {
		for _, m := range s.Machines() {
			if m.OverlayIP.IsValid() {
				out[m.ID] = m.OverlayIP.String()
			}
		}
	})
	return out
}

// SetMeta changes what this machine gossips about itself.
func (n *Node) SetMeta(update func(*Meta)) error { return n.gossip.setMeta(update) }

// LocalMeta is what this machine gossips about itself.
func (n *Node) LocalMeta() Meta { return n.gossip.localMeta() }

// Members lists every machine gossip knows, including failed ones.
func (n *Node) Members() []Member { return n.gossip.snapshot() }

// MembersVersion grows with every change gossip sees in a member's
// metadata or liveness: equal versions, equal Members (but for the time
// of the last probe).
func (n *Node) MembersVersion() uint64 { return n.gossip.version.Load() }

// MembersChanged is closed when MembersVersion next grows: take it before
// reading the version, and no change is missed.
func (n *Node) MembersChanged() <-chan struct{} { return n.gossip.movedChan() }

// Member looks one machine up in gossip.
func (n *Node) Member(id string) (Member, bool) { return n.gossip.member(id) }

// Halted is closed when the fact store met a log entry it cannot decode;
// the daemon must stop (state must never diverge).
func (n *Node) Halted() <-chan struct{} { return n.halted }

// HaltErr says why the node halted.
func (n *Node) HaltErr() error {
	n.haltMu.Lock()
	defer n.haltMu.Unlock()
	return n.hErr
}

func (n *Node) haltOn(err error) {
	n.halt.Do(func() {
		n.haltMu.Lock()
		n.hErr = err
		n.haltMu.Unlock()
		n.logger.Error("fact store halted: this machine stops to keep its state from diverging", "err", err)
		close(n.halted)
	})
}

// StartRaft starts the RPC server on addr (the overlay address once the
// mesh is up) and gossips where it listens. A machine that holds Raft
// state (it was a server before) starts Raft too; any other follows the
// facts from a server (follow.go) until the leader makes it a server, or
// until Bootstrap makes it the first.
func (n *Node) StartRaft(addr netip.Addr) error {
	if n.net.Load() != nil {
		return errors.New("raft already started")
	}
	stores, err := n.openRaftStores()
	if err != nil {
		return err
	}
	rpcAddr := netip.AddrPortFrom(addr, uint16(n.cfg.RPCPort))
	rpcLn, err := listenBound(rpcAddr, n.cfg.Device, "RPC", n.logger)
	if err != nil {
		stores.store.Close()
		return fmt.Errorf("rpc listener on %s: %w", rpcAddr, err)
	}
	n.stores.Store(stores)
	self := newPipeListener()
	np := &netParts{
		http: &http.Server{Handler: n.rpcHandler(), ReadHeaderTimeout: 5 * time.Second,
			ConnContext: func(ctx context.Context, c net.Conn) context.Context {
				if _, ok := c.(*selfConn); ok {
					return context.WithValue(ctx, selfKey{}, true)
				}
				return ctx
			}},
		self:     &http.Client{Transport: &http.Transport{DialContext: self.dial}},
		addr:     addr,
		raftAddr: netip.AddrPortFrom(addr, uint16(n.cfg.RaftPort)),
		rpcAddr:  rpcAddr,
	}
	n.net.Store(np)
	n.wg.Add(2)
	for _, ln := range []net.Listener{rpcLn, self} {
		go func() {
			defer n.wg.Done()
			if err := np.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				n.logger.Error("rpc server stopped", "err", err)
			}
		}()
	}
	has, err := raft.HasExistingState(stores.store, stores.store, stores.snaps)
	if err != nil {
		return fmt.Errorf("reading raft state: %w", err)
	}
	if has {
		if err := n.startRaftServer(); err != nil {
			return err
		}
	} else {
		n.observer.Store(true)
		n.wg.Add(1)
		go n.follow()
	}
	return n.gossip.setMeta(func(m *Meta) {
		m.RaftAddr = np.raftAddr.String()
		m.RPCAddr = rpcAddr.String()
		m.Observer = !has
	})
}

// openRaftStores opens Raft's log and snapshots under the data dir.
func (n *Node) openRaftStores() (*raftStores, error) {
	dir := filepath.Join(n.cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating raft dir: %w", err)
	}
	hlog := hclog.New(&hclog.LoggerOptions{
		Name:   "raft",
		Output: newLevelWriter(n.logger, "raft"),
		Level:  hclog.Info,
	})
	store, err := raftboltdb.New(raftboltdb.Options{
		Path:        filepath.Join(dir, "raft.db"),
		BoltOptions: &bbolt.Options{Timeout: 2 * time.Second},
	})
	if err != nil {
		return nil, fmt.Errorf("opening raft log %s (is another droverd using this data dir?): %w", filepath.Join(dir, "raft.db"), err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 3, hlog)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("opening raft snapshots: %w", err)
	}
	return &raftStores{store: store, snaps: snaps, hlog: hlog}, nil
}

// startRaftServer starts Raft on the address StartRaft took, over the
// stores it opened.
func (n *Node) startRaftServer() error {
	n.raftStart.Lock()
	defer n.raftStart.Unlock()
	if n.raftStart.closed {
		return errors.New("the node is closing")
	}
	np, stores := n.net.Load(), n.stores.Load()
	if np == nil || stores == nil {
		return ErrRaftNotStarted
	}
	if n.rs.Load() != nil {
		return nil
	}
	raftLn, err := listenBound(np.raftAddr, n.cfg.Device, "Raft", n.logger)
	if err != nil {
		return fmt.Errorf("raft transport on %s: %w", np.raftAddr, err)
	}
	stream := &raftStream{Listener: raftLn, advertise: net.TCPAddrFromAddrPort(np.raftAddr)}
	if n.cfg.Device != "" {
		stream.source = &net.TCPAddr{IP: np.addr.AsSlice()}
	}
	transport := raft.NewNetworkTransportWithLogger(stream, 3, 10*time.Second, stores.hlog)

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.MachineID)
	rc.Logger = stores.hlog
	if hb := n.cfg.Timing.RaftHeartbeat; hb > 0 {
		rc.HeartbeatTimeout = hb
		rc.ElectionTimeout = hb
		rc.LeaderLeaseTimeout = hb / 2
		rc.CommitTimeout = hb / 20
	}
	leaderCh := make(chan bool, 8)
	rc.NotifyCh = leaderCh
	snaps := &indexedSnapshots{SnapshotStore: stores.snaps, facts: n.facts}
	r, err := raft.NewRaft(rc, n.facts, stores.store, stores.store, snaps, transport)
	if err != nil {
		transport.Close()
		return fmt.Errorf("starting raft: %w", err)
	}
	parts := &raftParts{raft: r, transport: transport, raftAddr: np.raftAddr}
	n.rs.Store(parts)
	n.wg.Add(3)
	go n.announceCommits(parts)
	go n.observeLeaders(r)
	go n.runLeaderLoop(leaderCh)
	if err := n.gossip.setMeta(func(m *Meta) { m.Observer = false }); err != nil {
		n.logger.Warn("gossiping that this machine is a Raft server", "err", err)
	}
	return nil
}

// overlaySource is the address this machine's calls to others come
// from: its overlay address once the RPC server runs (the mesh would
// pick it anyway; named, it also holds when machines share a network
// namespace).
func (n *Node) overlaySource() net.Addr {
	if n.cfg.Device == "" {
		return nil
	}
	if np := n.net.Load(); np != nil {
		return &net.TCPAddr{IP: np.addr.AsSlice()}
	}
	return nil
}

func (n *Node) parts() (*raftParts, error) {
	p := n.rs.Load()
	if p == nil {
		return nil, ErrRaftNotStarted
	}
	return p, nil
}

// Bootstrap makes this machine the first voter of a new cluster. It does
// nothing, and says so, when Raft state already exists.
func (n *Node) Bootstrap() (bool, error) {
	stores := n.stores.Load()
	if stores == nil {
		return false, ErrRaftNotStarted
	}
	has, err := raft.HasExistingState(stores.store, stores.store, stores.snaps)
	if err != nil {
		return false, fmt.Errorf("reading raft state: %w", err)
	}
	if has {
		return false, nil
	}
	if err := n.startRaftServer(); err != nil {
		return false, err
	}
	p := n.rs.Load()
	f := p.raft.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter,
		ID:       raft.ServerID(n.cfg.MachineID),
		Address:  raft.ServerAddress(p.raftAddr.String()),
	}}})
	if err := f.Error(); err != nil {
		return false, fmt.Errorf("bootstrapping raft: %w", err)
	}
	return true, nil
}

// HasRaftState tells whether this machine has ever been part of a Raft
// cluster (bootstrapped or replicated to).
func (n *Node) HasRaftState() (bool, error) {
	stores := n.stores.Load()
	if stores == nil {
		return false, ErrRaftNotStarted
	}
	return raft.HasExistingState(stores.store, stores.store, stores.snaps)
}

// Read gives fn the current facts; fn must not keep the state or block.
func (n *Node) Read(fn func(*fsm.State)) { n.facts.read(fn) }

// Apply proposes cmd to the cluster, forwarding it to the leader when this
// machine is not the leader, and returns the command's result as JSON. A
// command that breaks a rule of the store returns a *fsm.RuleError. When
// Apply returns, this machine's own facts include the command.
func (n *Node) Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error) {
	data, err := fsm.Encode(cmd)
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", cmd.Type(), err)
	}
	if len(data) > MaxCommandBytes {
		return nil, fmt.Errorf("%s of %d KiB: %w: the limit is %d KiB", cmd.Type(), len(data)>>10, ErrCommandTooLarge, MaxCommandBytes>>10)
	}
	if n.net.Load() == nil {
		return nil, ErrRaftNotStarted
	}
	backoff := 20 * time.Millisecond
	began := time.Now()
	for {
		res, err := n.applyOnce(ctx, data)
		if err == nil {
			n.waitApplied(ctx, res.Index)
			if o := n.cfg.Observer; o != nil {
				o.Committed(time.Since(began))
			}
			return res.Value, res.err()
		}
		if !errors.Is(err, ErrNotLeader) && !errors.Is(err, errRemoteNotLeader) && !errors.Is(err, errNoLeaderYet) {
			return nil, fmt.Errorf("applying %s: %w", cmd.Type(), err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("applying %s: %w (%v)", cmd.Type(), ErrNoLeader, ctx.Err())
		case <-n.ctx.Done():
			return nil, fmt.Errorf("applying %s: node is shutting down: %w", cmd.Type(), ErrNoLeader)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

var errNoLeaderYet = errors.New("leader not known yet")

func (n *Node) applyOnce(ctx context.Context, data []byte) (applyResult, error) {
	if n.leading() {
		return n.applyLocal(ctx, data)
	}
	leaderID := n.leaderID()
	if leaderID == "" {
		return applyResult{}, errNoLeaderYet
	}
	addr := n.rpcAddrOf(leaderID)
	if addr == "" {
		return applyResult{}, errNoLeaderYet
	}
	res, err := n.forward(ctx, leaderID, addr, data)
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		// Nothing was sent: safe to try again once the leader is known.
		return res, fmt.Errorf("%w: %v", errNoLeaderYet, err)
	}
	if err != nil && !errors.Is(err, errRemoteNotLeader) {
		return res, fmt.Errorf("%w: %v", ErrUncertain, err)
	}
	return res, err
}

// forwardTimeout bounds one forwarded command: the leader gives up on
// its own apply after 10 s, so an answer later than this will not come.
const forwardTimeout = 12 * time.Second

// forward sends data to the leader at addr. The call ends when the
// leader answers, after forwardTimeout, or as soon as this machine sees
// another leader than leaderID: a connection to a leader that is gone may
// hang until TCP gives up, long after a new leader serves commands.
func (n *Node) forward(ctx context.Context, leaderID, addr string, data []byte) (applyResult, error) {
	ctx, cancel := context.WithTimeout(ctx, forwardTimeout)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if n.leaderID() != leaderID {
					cancel()
					return
				}
			}
		}
	}()
	defer func() { cancel(); <-watched }()
	res, err := n.rpc.apply(ctx, addr, data)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("the leader %s did not answer before it was replaced or %v passed: %w", leaderID, forwardTimeout, err)
	}
	return res, err
}

// applyLocal applies data through this machine's Raft, which must lead.
func (n *Node) applyLocal(ctx context.Context, data []byte) (applyResult, error) {
	p, err := n.parts()
	if err != nil {
		return applyResult{}, err
	}
	timeout := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	f := p.raft.Apply(data, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return applyResult{}, ErrNotLeader
		}
		if errors.Is(err, raft.ErrLeadershipLost) {
			return applyResult{}, fmt.Errorf("%w: %v", ErrUncertain, err)
		}
		return applyResult{}, fmt.Errorf("raft apply: %w", err)
	}
	res, _ := f.Response().(applyResult)
	res.Index = f.Index()
	return res, nil
}

// observeLeaders tells the observer each change of leader this machine
// sees, until the node closes.
func (n *Node) observeLeaders(r *raft.Raft) {
	defer n.wg.Done()
	if n.cfg.Observer == nil {
		return
	}
	ch := make(chan raft.Observation, 8)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	r.RegisterObserver(obs)
	defer r.DeregisterObserver(obs)
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-ch:
			n.cfg.Observer.LeaderChanged()
		}
	}
}

// announce asks announceCommits to tell the followers what committed: a
// follower waits for it (its forwarded command, or its CaughtUp).
func (n *Node) announce() {
	select {
	case n.committed <- struct{}{}:
	default: // an announcement is due already; it covers this one
	}
}

// announceCommits tells the followers at once that commands committed,
// when one of them waits for it: its forwarded command committed, or it
// asked how far the leader's facts go (CaughtUp). A follower learns an
// entry committed only from the leader's next AppendEntries, which
// hashicorp/raft sends for a new entry or after its commit timeout
// (50 ms in production): a command proposed through a follower waited
// that long, on average 75 ms, to be in the proposer's own facts. A
// barrier is a new entry: replicating it carries the commit index to
// every follower within a round trip. Requests that come while a barrier
// is on its way share the next one. A command the leader proposes for
// itself announces nothing: its proposer does not wait on a follower,
// and a barrier after each would double its log writes.
func (n *Node) announceCommits(p *raftParts) {
	defer n.wg.Done()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-n.committed:
		}
		if p.raft.State() != raft.Leader {
			continue
		}
		// The barrier's future is not waited on: one still queued when
		// Raft shuts down is never answered, and Close would wait for this
		// loop forever. Its entry is what matters; requests that come
		// until it is applied (or for at most announceWait) share it.
		p.raft.Barrier(time.Second)
		target := p.raft.LastIndex()
		deadline := time.NewTimer(announceWait)
		tick := time.NewTicker(time.Millisecond)
	wait:
		for p.raft.AppliedIndex() < target {
			select {
			case <-n.ctx.Done():
				break wait
			case <-deadline.C:
				break wait
			case <-tick.C:
			}
		}
		deadline.Stop()
		tick.Stop()
	}
}

// announceWait bounds how long an announcement waits for its barrier to
// apply before the next may go.
const announceWait = 100 * time.Millisecond

// FactsIndex is the log index of the last command this machine's fact
// store applied: when it moves, the facts may have changed. Cheap enough
// to poll.
func (n *Node) FactsIndex() uint64 { return n.facts.applied.Load() }

// FactsChanged is closed when the fact store applies its next entry:
// read it, read the facts, then wait on it, and no change is missed.
func (n *Node) FactsChanged() <-chan struct{} { return n.facts.appliedChanged() }

// waitApplied waits, within ctx and a few seconds, until this machine's
// facts include log index idx.
func (n *Node) waitApplied(ctx context.Context, idx uint64) {
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	for {
		changed := n.facts.appliedChanged()
		if n.facts.applied.Load() >= idx {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			return
		case <-changed:
		}
	}
}

// CaughtUp returns once this machine's facts include everything the
// leader had applied when asked: what a machine must wait for before it
// acts on facts after a start (acting on an empty or stale store could
// stop workloads it still owns), or on facts another machine just wrote
// through the leader.
//
// A follower compares fact-store indexes, not log indexes: barriers,
// no-ops and configuration changes take log indexes the fact store never
// sees, so a follower can have every fact and still be below the
// leader's last log index until the next command comes.
func (n *Node) CaughtUp(ctx context.Context) error {
	if n.net.Load() == nil {
		return ErrRaftNotStarted
	}
	if p := n.rs.Load(); p != nil && p.raft.State() == raft.Leader {
		if err := p.raft.Barrier(10 * time.Second).Error(); err != nil {
			return fmt.Errorf("raft barrier: %w", err)
		}
		return nil
	}
	leaderID := n.leaderID()
	addr := n.rpcAddrOf(leaderID)
	if leaderID == "" || addr == "" {
		return ErrNoLeader
	}
	st, err := n.rpc.stats(ctx, addr)
	if err != nil {
		return fmt.Errorf("asking the leader how far its log goes: %w", err)
	}
	target := st.FactsIndex
	if target == 0 {
		target = st.LastIndex // a leader that does not say, or has applied no command yet
	}
	for n.facts.applied.Load() < target {
		select {
		case <-ctx.Done():
			return fmt.Errorf("catching up to log index %d (at %d): %w", target, n.facts.applied.Load(), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// rpcAddrOf finds a machine's RPC address: gossip first, then the facts;
// the facts only when gossip's claim comes with another key than the one
// registered.
func (n *Node) rpcAddrOf(id string) string {
	var have fsm.Machine
	n.facts.read(func(s *fsm.State) { have, _ = s.Machine(id) })
	if m, ok := n.gossip.member(id); ok && m.RPCAddr != "" && !ImpostorOf(have, m) {
		return m.RPCAddr
	}
	return have.RPCAddr
}

// Freshness says whether this machine's facts may be stale: it is not in
// Raft yet, knows no leader, or has not heard from the leader for three
// heartbeat timeouts. Since is the last time it knew them current (zero
// when never).
type Freshness struct {
	Stale  bool
	Since  time.Time
	Reason string
}

// Freshness tells how current this machine's facts are.
func (n *Node) Freshness() Freshness {
	if n.observing() {
		return n.followFreshness(n.following.Load())
	}
	p, err := n.parts()
	if err != nil {
		return Freshness{Stale: true, Reason: "this machine takes no part in Raft yet"}
	}
	if p.raft.State() == raft.Leader {
		return Freshness{}
	}
	last := p.raft.LastContact()
	if left := n.leftLeadership.Load(); left != 0 && time.Unix(0, left).After(last) {
		last = time.Unix(0, left) // it led until then
	}
	limit := 3 * n.raftHeartbeat()
	_, leader := p.raft.LeaderWithID()
	switch {
	case last.IsZero():
		return Freshness{Stale: true, Reason: "this machine has never heard from a leader"}
	case leader == "":
		return Freshness{Stale: true, Since: last, Reason: "this machine knows no leader"}
	case time.Since(last) > limit:
		return Freshness{Stale: true, Since: last, Reason: fmt.Sprintf("this machine has not heard from the leader for over %s", limit)}
	}
	return Freshness{}
}

// raftHeartbeat is Raft's heartbeat timeout on this machine.
func (n *Node) raftHeartbeat() time.Duration {
	if hb := n.cfg.Timing.RaftHeartbeat; hb > 0 {
		return hb
	}
	return raft.DefaultConfig().HeartbeatTimeout
}

func (n *Node) localStats() serverStats {
	p, err := n.parts()
	if err != nil {
		return serverStats{LastContact: -1, FactsIndex: n.FactsIndex()}
	}
	st := p.raft.Stats()
	out := serverStats{FactsIndex: n.FactsIndex()}
	out.LastTerm, _ = strconv.ParseUint(st["last_log_term"], 10, 64)
	out.LastIndex, _ = strconv.ParseUint(st["last_log_index"], 10, 64)
	switch lc := st["last_contact"]; lc {
	case "never":
		out.LastContact = -1
	case "0", "":
		out.LastContact = 0
	default:
		d, err := time.ParseDuration(lc)
		if err != nil {
			d = -1
		}
		out.LastContact = d
	}
	if p.raft.State() == raft.Leader {
		out.LastContact = 0
	}
	return out
}

// RemoveServer takes a machine out of the Raft configuration, through the
// leader. Call it only once the machine left or is dead: the leader adds
// back every machine gossip sees alive.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	if n.net.Load() == nil {
		return ErrRaftNotStarted
	}
	backoff := 50 * time.Millisecond
	for {
		var err error
		if n.leading() {
			err = n.removeServerLocal(id)
		} else if leaderID := n.leaderID(); leaderID == "" {
			err = errNoLeaderYet
		} else if addr := n.rpcAddrOf(leaderID); addr == "" {
			err = errNoLeaderYet
		} else {
			err = n.rpc.do(ctx, http.MethodPost, addr, rpcRemovePath, []byte(id), &struct{}{})
		}
		if err == nil || (!errors.Is(err, ErrNotLeader) && !errors.Is(err, errRemoteNotLeader) && !errors.Is(err, errNoLeaderYet)) {
			if err != nil {
				return fmt.Errorf("removing machine %s from raft: %w", id, err)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("removing machine %s from raft: %w (%v)", id, ErrNoLeader, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

func (n *Node) removeServerLocal(id string) error {
	p, err := n.parts()
	if err != nil {
		return err
	}
	f := p.raft.RemoveServer(raft.ServerID(id), 0, 10*time.Second)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return ErrNotLeader
		}
		return fmt.Errorf("raft remove server: %w", err)
	}
	n.logger.Info("removed machine from raft", "machine", id)
	return nil
}

// Leave departs gracefully: hand leadership to another voter if this
// machine leads, then tell gossip we are leaving (so others see "left",
// not "failed"). Raft membership is kept: a machine is removed from the
// cluster only by an operator. Call Close afterwards.
func (n *Node) Leave(timeout time.Duration) error {
	var errs []error
	if p, err := n.parts(); err == nil && p.raft.State() == raft.Leader {
		if err := p.raft.LeadershipTransfer().Error(); err != nil && !errors.Is(err, raft.ErrNotLeader) {
			n.logger.Warn("could not hand over leadership before leaving", "err", err)
		} else {
			n.logger.Info("handed over leadership before leaving")
		}
	}
	if err := n.gossip.leave(timeout); err != nil {
		errs = append(errs, fmt.Errorf("leaving gossip: %w", err))
	}
	return errors.Join(errs...)
}

// Close stops Raft, RPC and gossip and every goroutine of the node.
func (n *Node) Close() error {
	var errs []error
	n.closed.Do(func() {
		n.cancel()
		if np := n.net.Load(); np != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			if err := np.http.Shutdown(ctx); err != nil {
				np.http.Close()
			}
			cancel()
		}
		n.raftStart.Lock() // no Raft starts from here on
		n.raftStart.closed = true
		n.raftStart.Unlock()
		if p := n.rs.Load(); p != nil {
			if err := p.raft.Shutdown().Error(); err != nil {
				errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
			}
			if err := p.transport.Close(); err != nil {
				errs = append(errs, fmt.Errorf("raft transport: %w", err))
			}
		}
		if st := n.stores.Load(); st != nil {
			if err := st.store.Close(); err != nil {
				errs = append(errs, fmt.Errorf("raft store: %w", err))
			}
		}
		if err := n.gossip.shutdown(); err != nil {
			errs = append(errs, fmt.Errorf("gossip shutdown: %w", err))
		}
		n.wg.Wait()
		n.rpc.close()
	})
	return errors.Join(errs...)
}

// watchGossip keeps the known-peers file current and nudges the leader's
// reconcile loop on every membership change. It also drops the pooled
// connections of the fact store's calls: a machine that restarted came
// back through gossip, and a connection pooled to its old process would
// fail a forwarded command with a reset, its outcome unknown.
func (n *Node) watchGossip() {
	defer n.wg.Done()
	// The known peers are written at most every peersSaveEvery: a
	// hundred machines joining at once changed the list a hundred times
	// on every machine, each an fsync.
	save := time.NewTicker(peersSaveEvery)
	defer save.Stop()
	dirty := false
	for {
		select {
		case <-n.ctx.Done():
			if dirty {
				_ = n.saveKnownPeers() // as it was at the end
			}
			return
		case <-save.C:
			if dirty {
				if err := n.saveKnownPeers(); err != nil {
					n.logger.Warn("could not save known peers", "err", err)
				}
				dirty = false
			}
			continue
		case <-n.gossip.changed:
		}
		n.rpc.http.CloseIdleConnections()
		select {
		case n.nudge <- struct{}{}:
		default:
		}
		dirty = true
	}
}

// peersSaveEvery bounds how often the known peers are written.
const peersSaveEvery = 5 * time.Second

// reconnectFailed tries, now and then, to reach the members gossip sees
// as failed. memberlist never probes a member it declared dead, so without
// this two sides of a healed partition would go on seeing each other dead.
// Members that left are not called back.
func (n *Node) reconnectFailed() {
	defer n.wg.Done()
	tick := time.NewTicker(n.cfg.Timing.ReconnectInterval)
	defer tick.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-tick.C:
		}
		for _, m := range n.gossip.snapshot() {
			if m.Liveness != LivenessFailed || !m.GossipAddr.IsValid() || n.ctx.Err() != nil {
				continue
			}
			if _, err := n.gossip.ml.Join([]string{m.GossipAddr.String()}); err == nil {
				n.logger.Info("reached a machine seen as failed", "machine", m.Name)
			}
		}
	}
}

func (n *Node) peersPath() string { return filepath.Join(n.cfg.DataDir, "peers.json") }

func (n *Node) saveKnownPeers() error {
	var addrs []string
	for _, m := range n.gossip.snapshot() {
		if m.MachineID != n.cfg.MachineID && m.Liveness != LivenessLeft && m.GossipAddr.IsValid() {
			addrs = append(addrs, m.GossipAddr.String())
		}
	}
	if len(addrs) == 0 {
		return nil
	}
	slices.Sort(addrs)
	b, err := json.Marshal(addrs)
	if err != nil {
		return err
	}
	if bytes.Equal(b, n.savedPeers) {
		return nil
	}
	if err := atomicfile.Write(n.peersPath(), b, 0o600); err != nil {
		return err
	}
	n.savedPeers = b
	return nil
}

func (n *Node) knownPeers() ([]string, error) {
	b, err := os.ReadFile(n.peersPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading known peers: %w", err)
	}
	var addrs []string
	if err := json.Unmarshal(b, &addrs); err != nil {
		return nil, fmt.Errorf("reading known peers %s: %w", n.peersPath(), err)
	}
	return addrs, nil
}
