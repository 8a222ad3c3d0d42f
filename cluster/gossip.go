package cluster

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Liveness is the gossip view of a machine: whether it answers probes.
type Liveness string

// Liveness values, as shown to operators.
const (
	LivenessAlive   Liveness = "alive"
	LivenessSuspect Liveness = "suspect"
	LivenessFailed  Liveness = "failed"
	LivenessLeft    Liveness = "left"
	LivenessUnknown Liveness = "unknown"
)

// Member is one machine as gossip sees it.
type Member struct {
	Meta
	GossipAddr  netip.AddrPort
	Liveness    Liveness
	Since       time.Time // when Liveness last changed
	LastContact time.Time // last successful probe of it by this machine; zero if none
}

// ErrKeyRefused says the cluster did not accept this machine's gossip:
// almost always because its cluster key differs.
var ErrKeyRefused = errors.New("the cluster refused this machine's gossip (is the cluster key right?)")

// gossip owns the memberlist instance and a table of every machine it has
// heard of, including failed and departed ones.
type gossip struct {
	// version grows with every change of a member's metadata or
	// liveness (not with probes).
	version atomic.Uint64
	ml      *memberlist.Memberlist
	keyring *memberlist.Keyring
	logger  *slog.Logger
	now     func() time.Time

	mu      sync.Mutex
	local   Meta
	members map[string]*Member // by machine id (the memberlist node name)
	changed chan struct{}      // nudged on any membership change; capacity 1
	moved   chan struct{}      // closed, and replaced, when version grows

	// overlays gives the overlay addresses this machine's facts hold, for
	// push/pull; learned is this machine's own, as another machine's
	// facts told it before this one has Raft.
	overlays func() map[string]string
	learned  netip.Addr
	// refusal is why the cluster's leader last refused to admit this
	// machine, as it told us; empty if it never did.
	refusal string
}

// productionProbeInterval is how often each machine probes another.
const productionProbeInterval = 700 * time.Millisecond

func startGossip(cfg Config, local Meta, logger *slog.Logger) (*gossip, error) {
	g := &gossip{
		logger:  logger.With("component", "gossip"),
		now:     cfg.Now,
		local:   local,
		members: map[string]*Member{},
		changed: make(chan struct{}, 1),
		moved:   make(chan struct{}),
	}
	mc := memberlist.DefaultLANConfig()
	// Failure detection within 5 s at a hundred machines (DESIGN.md,
	// "Failure detection"): memberlist waits SuspicionMult × log10(N) ×
	// ProbeInterval before it declares a suspect dead — 8 s at a hundred
	// with its LAN profile, and up to six times that until other members
	// confirm the suspicion. With 2 no confirmation is awaited, and a
	// live suspect refutes the suspicion as soon as gossip brings it.
	mc.ProbeInterval = productionProbeInterval
	mc.SuspicionMult = 2
	// Its messages are a few hundred bytes, encrypted: compressing each
	// one was a tenth of an idle machine's CPU (perf, bench/results).
	mc.EnableCompression = false
	if cfg.Timing.GossipProbeInterval > 0 {
		mc = memberlist.DefaultLocalConfig()
		mc.ProbeInterval = cfg.Timing.GossipProbeInterval
		mc.ProbeTimeout = cfg.Timing.GossipProbeInterval / 2
		mc.GossipInterval = cfg.Timing.GossipProbeInterval / 5
		mc.PushPullInterval = 10 * cfg.Timing.GossipProbeInterval
		mc.SuspicionMult = 2
	}
	mc.Name = cfg.MachineID
	mc.BindAddr = cfg.BindAddr.String()
	mc.BindPort = cfg.GossipPort
	mc.AdvertiseAddr = cfg.BindAddr.String()
	mc.AdvertisePort = cfg.GossipPort
	keyring, err := memberlist.NewKeyring(cfg.SecondaryKeys, cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("gossip keyring: %w", err)
	}
	g.keyring = keyring
	mc.Keyring = keyring
	mc.GossipVerifyIncoming = true
	mc.GossipVerifyOutgoing = true
	mc.Delegate = g
	mc.Events = g
	mc.Ping = g
	mc.Logger = log.New(&keyHintWriter{newLevelWriter(logger, "memberlist")}, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("starting gossip on %s: %w", net.JoinHostPort(mc.BindAddr, strconv.Itoa(mc.BindPort)), err)
	}
	g.ml = ml
	return g, nil
}

// join contacts the given gossip addresses; it succeeds if any answers.
func (g *gossip) join(addrs []string) (int, error) {
	if len(addrs) == 0 {
		return 0, nil
	}
	n, err := g.ml.Join(addrs)
	if n > 0 {
		return n, nil
	}
	if err != nil && isKeyError(err) {
		return 0, fmt.Errorf("joining through %v: %w: %v", addrs, ErrKeyRefused, err)
	}
	return 0, fmt.Errorf("joining through %v: %w", addrs, err)
}

// setMeta changes what this machine gossips about itself.
func (g *gossip) setMeta(update func(*Meta)) error {
	g.mu.Lock()
	update(&g.local)
	g.mu.Unlock()
	if err := g.ml.UpdateNode(5 * time.Second); err != nil {
		if strings.Contains(err.Error(), "timeout waiting for update broadcast") {
			// memberlist made the new metadata this node's state before it
			// waited: the broadcast is queued behind others (many machines
			// joining at once), and push/pull carries it at the latest.
			// Failing here left a machine that started Raft without telling
			// anyone (issue 19: 16 of 50 machines never in Raft).
			g.logger.Warn("new metadata not broadcast within 5 s: it spreads with the queue and the next state exchange", "err", err)
			return nil
		}
		return fmt.Errorf("gossiping new metadata: %w", err)
	}
	return nil
}

func (g *gossip) localMeta() Meta {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.local
}

// snapshot returns every machine gossip knows, sorted by name.
func (g *gossip) snapshot() []Member {
	live := map[string]memberlist.NodeStateType{}
	for _, n := range g.ml.Members() {
		live[n.Name] = n.State
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]Member, 0, len(g.members))
	for id, m := range g.members {
		c := *m
		if st, ok := live[id]; ok && st == memberlist.StateSuspect {
			c.Liveness = LivenessSuspect
		}
		if id == g.local.MachineID {
			c.LastContact = g.now()
		}
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (g *gossip) member(id string) (Member, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m, ok := g.members[id]
	if !ok {
		return Member{}, false
	}
	return *m, true
}

func (g *gossip) leave(timeout time.Duration) error {
	if err := g.setMeta(func(m *Meta) { m.Leaving = true }); err != nil {
		g.logger.Warn("could not announce leaving", "err", err)
	}
	// A full state exchange with every live member carries the Leaving
	// flag over TCP before the departure itself: gossip alone may bring
	// the departure first, and a machine then records "failed".
	var addrs []string
	self := g.localMeta().MachineID
	for _, m := range g.snapshot() {
		if m.MachineID != self && m.Liveness == LivenessAlive && m.GossipAddr.IsValid() {
			addrs = append(addrs, m.GossipAddr.String())
		}
	}
	if len(addrs) > 0 {
		if _, err := g.ml.Join(addrs); err != nil {
			g.logger.Debug("pushing the leaving flag", "err", err)
		}
	}
	return g.ml.Leave(timeout)
}

func (g *gossip) shutdown() error {
	return g.ml.Shutdown()
}

func (g *gossip) nudge() {
	select {
	case g.changed <- struct{}{}:
	default:
	}
}

func (g *gossip) record(n *memberlist.Node, liveness Liveness) {
	meta, err := decodeMeta(n.Meta)
	if err != nil {
		g.logger.Warn("ignoring a machine with unreadable metadata", "node", n.Name, "addr", n.Address(), "err", err)
		return
	}
	addr, _ := netip.AddrFromSlice(n.Addr)
	g.mu.Lock()
	m, ok := g.members[n.Name]
	if !ok {
		m = &Member{}
		g.members[n.Name] = m
	}
	if m.Liveness != liveness {
		m.Since = g.now()
		if ok {
			g.logger.Info("machine "+string(liveness), "machine", meta.Name, "id", n.Name)
		}
	}
	m.Meta = meta
	m.GossipAddr = netip.AddrPortFrom(addr.Unmap(), n.Port)
	m.Liveness = liveness
	g.version.Add(1)
	close(g.moved)
	g.moved = make(chan struct{})
	if liveness == LivenessAlive && m.LastContact.IsZero() {
		m.LastContact = g.now()
	}
	g.mu.Unlock()
	g.nudge()
}

// movedChan is closed when version next grows.
func (g *gossip) movedChan() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.moved
}

// NotifyJoin is memberlist's event for a machine that appeared.
func (g *gossip) NotifyJoin(n *memberlist.Node) { g.record(n, LivenessAlive) }

// NotifyUpdate is memberlist's event for changed metadata.
func (g *gossip) NotifyUpdate(n *memberlist.Node) { g.record(n, LivenessAlive) }

// NotifyLeave is memberlist's event for a machine that failed or left.
func (g *gossip) NotifyLeave(n *memberlist.Node) {
	if meta, err := decodeMeta(n.Meta); err == nil && meta.Leaving {
		g.record(n, LivenessLeft)
		return
	}
	g.record(n, LivenessFailed)
}

// NotifyPingComplete records a successful probe as the last contact.
func (g *gossip) NotifyPingComplete(n *memberlist.Node, _ time.Duration, _ []byte) {
	g.mu.Lock()
	if m, ok := g.members[n.Name]; ok {
		m.LastContact = g.now()
	}
	g.mu.Unlock()
}

// AckPayload adds nothing to probe acks.
func (g *gossip) AckPayload() []byte { return nil }

// NodeMeta is the metadata this machine gossips.
func (g *gossip) NodeMeta(limit int) []byte {
	b, err := encodeMeta(g.localMeta())
	if err != nil || len(b) > limit {
		g.logger.Error("local gossip metadata does not fit", "err", err, "limit", limit)
		return nil
	}
	return b
}

// userMsgVersion is the first byte of drover's gossip user messages.
const userMsgVersion byte = 1

// userMsg is a message one machine sends another over gossip: today only
// the leader's refusal to admit a newcomer, which has no other way to
// hear why (it is not a peer of the mesh yet).
type userMsg struct {
	Refused string `json:"refused,omitempty"`
	// Grant is the join grant the refused metadata presented ("" for
	// none): a machine that joins again with another token ignores a
	// refusal of its earlier attempt still on its way.
	Grant string `json:"grant,omitempty"`
}

// NotifyMsg receives user messages.
func (g *gossip) NotifyMsg(b []byte) {
	if len(b) == 0 || b[0] != userMsgVersion || len(b) > 4096 {
		return
	}
	var m userMsg
	if err := json.Unmarshal(b[1:], &m); err != nil || m.Refused == "" {
		return
	}
	g.mu.Lock()
	presented := ""
	if g.local.Join != nil {
		presented = g.local.Join.Grant
	}
	if m.Grant != presented {
		g.mu.Unlock()
		return
	}
	changed := g.refusal != m.Refused
	g.refusal = m.Refused
	g.mu.Unlock()
	if changed {
		g.logger.Error("the cluster refused to admit this machine", "reason", m.Refused)
	}
}

// tell sends a user message to the machine with the given id.
func (g *gossip) tell(id string, m userMsg) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	// A node of our own: memberlist's Members() points into its state,
	// which its handlers write while we would read it.
	member, ok := g.member(id)
	if !ok || !member.GossipAddr.IsValid() {
		return fmt.Errorf("machine %s is not in gossip", id)
	}
	to := &memberlist.Node{Name: id, Addr: member.GossipAddr.Addr().AsSlice(), Port: member.GossipAddr.Port()}
	return g.ml.SendReliable(to, append([]byte{userMsgVersion}, b...))
}

func (g *gossip) lastRefusal() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.refusal
}

// keys are the installed gossip keys, the primary first.
func (g *gossip) keys() [][]byte {
	primary := g.keyring.GetPrimaryKey()
	out := [][]byte{primary}
	for _, k := range g.keyring.GetKeys() {
		if !bytes.Equal(k, primary) {
			out = append(out, k)
		}
	}
	return out
}

// setKeys installs exactly keys (keys[0] the primary) in the keyring.
func (g *gossip) setKeys(keys [][]byte) error {
	for _, k := range keys {
		if err := g.keyring.AddKey(k); err != nil {
			return fmt.Errorf("installing a gossip key: %w", err)
		}
	}
	if err := g.keyring.UseKey(keys[0]); err != nil {
		return fmt.Errorf("using the new primary gossip key: %w", err)
	}
	for _, k := range g.keyring.GetKeys() {
		if !slices.ContainsFunc(keys, func(want []byte) bool { return bytes.Equal(want, k) }) {
			if err := g.keyring.RemoveKey(k); err != nil {
				return fmt.Errorf("removing a retired gossip key: %w", err)
			}
		}
	}
	return nil
}

// GetBroadcasts has nothing to broadcast.
func (g *gossip) GetBroadcasts(int, int) [][]byte { return nil }

// pushPullVersion is the first byte of drover's push/pull state.
const pushPullVersion byte = 1

// pushPull is what machines exchange on every full state sync: the
// overlay addresses their facts hold, so that a machine not yet in Raft
// learns its own.
type pushPull struct {
	Overlays map[string]string `json:"overlays"`
}

// LocalState is sent on push/pull syncs.
func (g *gossip) LocalState(bool) []byte {
	if g.overlays == nil {
		return nil
	}
	b, err := json.Marshal(pushPull{Overlays: g.overlays()})
	if err != nil {
		return nil
	}
	return append([]byte{pushPullVersion}, b...)
}

// MergeRemoteState reads another machine's push/pull state.
func (g *gossip) MergeRemoteState(buf []byte, _ bool) {
	if len(buf) == 0 || buf[0] != pushPullVersion {
		return
	}
	var pp pushPull
	if err := json.Unmarshal(buf[1:], &pp); err != nil {
		g.logger.Warn("unreadable push/pull state", "err", err)
		return
	}
	g.mu.Lock()
	id := g.local.MachineID
	g.mu.Unlock()
	if a, err := netip.ParseAddr(pp.Overlays[id]); err == nil {
		g.mu.Lock()
		changed := g.learned != a
		g.learned = a
		g.mu.Unlock()
		if changed {
			g.logger.Info("learned this machine's overlay address over gossip", "overlay", a)
			g.nudge()
		}
	}
}

func (g *gossip) learnedOverlay() netip.Addr {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.learned
}
