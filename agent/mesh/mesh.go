// Package mesh keeps this machine's WireGuard device in line with the
// facts and gossip: a peer per machine, and each service IP routed to the
// machine that owns the service. The config is a pure function of what
// it is computed from; netmesh applies it. See DESIGN.md.
package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/atomicfile"
	"github.com/drover-sh/drover/netmesh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// KeyFile is where a machine keeps its WireGuard key, in its data dir.
const KeyFile = "wg.key"

// PeersFile is where a machine keeps its device's peers, in its data
// dir, so that a restarted daemon brings the mesh back before its facts
// and gossip do.
const PeersFile = "mesh-peers.json"

// keepAlive keeps every pair of machines handshaken, also those that
// exchange no Raft traffic, so a broken path shows before it is needed.
const keepAlive = 25 * time.Second

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	// FactsIndex grows with every command the store applies.
	FactsIndex() uint64
	// FactsChanged is closed when the store applies its next entry.
	FactsChanged() <-chan struct{}
}

// Local holds the service IPs this machine owns (on its loopback): the
// local half of routing a service IP to its owner.
type Local interface {
	Set(ips []netip.Addr) error
}

// Members is gossip's view of the machines.
type Members interface {
	Members() []cluster.Member
}

// Device is the WireGuard device (netmesh.Device).
type Device interface {
	Set(cfg netmesh.Config) error
	Status() (netmesh.Status, error)
	Close() error
}

// Config is what the mesh needs to know of its machine.
type Config struct {
	Self   string       // this machine's id
	Port   int          // WireGuard's UDP port on the underlay
	Prefix netip.Prefix // the overlay's range
	// Local, when set, is given the service IPs of the services this
	// machine owns whenever the facts change.
	Local  Local
	Logger *slog.Logger
}

// Mesh is this machine's part of the mesh.
type Mesh struct {
	cfg Config
	dev Device
	key wgtypes.Key

	mu      sync.Mutex
	overlay netip.Addr // zero until known

	// peersPath keeps the peers across restarts (empty: not kept);
	// kept are those read at the start, saved the last written.
	peersPath string
	kept      []netmesh.Peer
	saved     []byte
	toKeep    []byte    // the peers to write, from the last keep
	keptAt    time.Time // when PeersFile was last written

	// considered counts Run's wake-ups done: the device and the loopback
	// hold the plan of the facts read in it.
	considered atomic.Int64
	planned    atomic.Int64 // plans Run computed
}

// Open loads (or makes, once) the machine's key in dataDir and opens the
// device named iface.
func Open(cfg Config, dataDir, iface string) (*Mesh, error) {
	key, err := netmesh.LoadOrCreateKey(filepath.Join(dataDir, KeyFile))
	if err != nil {
		return nil, err
	}
	dev, err := netmesh.Open(iface, cfg.Logger)
	if err != nil {
		return nil, err
	}
	m := New(cfg, dev, key)
	m.peersPath = filepath.Join(dataDir, PeersFile)
	if b, err := os.ReadFile(m.peersPath); err == nil {
		if m.kept, err = decodePeers(b); err != nil {
			cfg.Logger.Warn("ignoring the mesh peers kept from before a restart", "file", m.peersPath, "err", err)
		}
		m.saved = b
	}
	return m, nil
}

// New makes a mesh on an open device.
func New(cfg Config, dev Device, key wgtypes.Key) *Mesh {
	return &Mesh{cfg: cfg, dev: dev, key: key}
}

// PublicKey is this machine's WireGuard public key.
func (m *Mesh) PublicKey() string { return m.key.PublicKey().String() }

// SetOverlay gives the device this machine's overlay address.
func (m *Mesh) SetOverlay(addr netip.Addr) {
	m.mu.Lock()
	m.overlay = addr
	m.mu.Unlock()
}

// Overlay is this machine's overlay address; zero until known.
func (m *Mesh) Overlay() netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.overlay
}

// Status reads the device.
func (m *Mesh) Status() (netmesh.Status, error) { return m.dev.Status() }

// Close closes the device.
func (m *Mesh) Close() error { return m.dev.Close() }

// Sync sets the device to the config computed from facts and gossip now,
// and the local service IPs to those of the services this machine owns.
//
// Until the facts hold this machine (a daemon that just restarted has
// not replayed them yet) the peers kept from before the restart are
// added to what gossip gives, so the device has them — and handshakes
// them — at once: a restart does not cut the services of this machine
// off for the time it takes to rejoin. Once the facts hold this machine,
// they alone decide, and the peers are kept for the next restart.
func (m *Mesh) Sync(facts Facts, members Members) error { return m.apply(m.plan(facts, members)) }

// meshPlan is what the device and the loopback should hold now.
type meshPlan struct {
	cfg    netmesh.Config
	own    []netip.Addr
	member bool
}

// plan computes the device's config and the local service IPs from the
// facts and gossip, touching neither.
func (m *Mesh) plan(facts Facts, members Members) meshPlan {
	var p meshPlan
	gossip := members.Members()
	facts.Read(func(s *fsm.State) {
		p.cfg = m.desired(s, gossip)
		p.own = s.ServiceIPsOf(m.cfg.Self)
		_, p.member = s.Machine(m.cfg.Self)
	})
	m.mu.Lock()
	if !p.member {
		p.cfg.Peers = withKept(p.cfg.Peers, m.kept)
	}
	m.mu.Unlock()
	return p
}

// apply sets the loopback and the device to p.
func (m *Mesh) apply(p meshPlan) error {
	var errs []error
	if m.cfg.Local != nil && p.member {
		// Local first: on the machine that just took a service, its IP
		// answers here before the route to the old owner goes. Before the
		// facts are back, the addresses stay as they are.
		if err := m.cfg.Local.Set(p.own); err != nil {
			errs = append(errs, fmt.Errorf("service IPs on the loopback: %w", err))
		}
	}
	err := m.dev.Set(p.cfg)
	if err != nil {
		errs = append(errs, err)
	}
	if err == nil && p.member {
		errs = append(errs, m.keep(p.cfg.Peers))
	}
	return errors.Join(errs...)
}

// withKept adds to peers the kept ones whose key is not among them.
func withKept(peers, kept []netmesh.Peer) []netmesh.Peer {
	have := map[wgtypes.Key]bool{}
	for _, p := range peers {
		have[p.PublicKey] = true
	}
	for _, p := range kept {
		if !have[p.PublicKey] {
			peers = append(peers, p)
		}
	}
	return peers
}

// keptPeer is a peer as PeersFile holds it.
type keptPeer struct {
	PublicKey  string         `json:"public_key"`
	Endpoint   netip.AddrPort `json:"endpoint,omitzero"`
	AllowedIPs []netip.Prefix `json:"allowed_ips"`
}

// keep writes the peers to PeersFile when they changed, at most every
// keepEvery (a hundred machines joining changed every machine's peers
// two hundred times, each write an fsync); flushKept writes what is
// left.
func (m *Mesh) keep(peers []netmesh.Peer) error {
	if m.peersPath == "" {
		return nil
	}
	out := make([]keptPeer, 0, len(peers))
	for _, p := range peers {
		out = append(out, keptPeer{PublicKey: p.PublicKey.String(), Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs})
	}
	slices.SortFunc(out, func(a, b keptPeer) int { return strings.Compare(a.PublicKey, b.PublicKey) })
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.toKeep = b
	if time.Since(m.keptAt) < keepEvery {
		return nil
	}
	return m.writeKeptLocked()
}

// flushKept writes the peers keep was last given, if it has not yet.
func (m *Mesh) flushKept() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writeKeptLocked()
}

func (m *Mesh) writeKeptLocked() error {
	if m.toKeep == nil || bytes.Equal(m.toKeep, m.saved) {
		return nil
	}
	if err := atomicfile.Write(m.peersPath, m.toKeep, 0o600); err != nil {
		return fmt.Errorf("keeping the mesh peers for a restart: %w", err)
	}
	m.saved, m.keptAt = m.toKeep, time.Now()
	return nil
}

// keepEvery bounds how often PeersFile is written.
const keepEvery = 5 * time.Second

// decodePeers reads PeersFile.
func decodePeers(b []byte) ([]netmesh.Peer, error) {
	var in []keptPeer
	if err := json.Unmarshal(b, &in); err != nil {
		return nil, err
	}
	peers := make([]netmesh.Peer, 0, len(in))
	for _, k := range in {
		key, err := wgtypes.ParseKey(k.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("peer %q: %w", k.PublicKey, err)
		}
		peers = append(peers, netmesh.Peer{PublicKey: key, Endpoint: k.Endpoint, AllowedIPs: k.AllowedIPs, KeepAlive: keepAlive})
	}
	return peers, nil
}

func (m *Mesh) desired(s *fsm.State, gossip []cluster.Member) netmesh.Config {
	return Desired(s, gossip, Self{ID: m.cfg.Self, Key: m.key, Port: m.cfg.Port, Overlay: m.Overlay(), Prefix: m.cfg.Prefix})
}

// Run keeps the device's peers and the local service IPs in line with
// membership and facts until ctx ends: at once when the facts change,
// woken by the store (a service IP follows its service as soon as the
// commit that moved it applies here), and when gossip changes — woken by
// it if it says when, every second otherwise. An idle machine wakes only
// every resyncEvery, and each second while a failed set or a PeersFile
// write is pending.
func (m *Mesh) Run(ctx context.Context, facts Facts, members Members) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	resync := time.NewTimer(resyncEvery)
	defer resync.Stop()
	var lastErr string
	var applied *meshPlan
	var appliedAt time.Time
	versioned, _ := members.(membersVersioned)
	var plannedFacts, plannedMembers uint64
	for {
		changed := facts.FactsChanged()
		var gossipMoved <-chan struct{}
		if versioned != nil {
			gossipMoved = versioned.MembersChanged()
		}
		// Planning walks the facts and gossip: skipped when neither moved
		// since the last plan applied. Reading the device and the routes
		// walks every peer and route: done when the plan changes, and
		// every resyncEvery to put back what something else changed.
		idx, ver := facts.FactsIndex(), uint64(0)
		if versioned != nil {
			ver = versioned.MembersVersion()
		}
		moved := versioned == nil || idx != plannedFacts || ver != plannedMembers
		if applied == nil || moved || time.Since(appliedAt) >= resyncEvery {
			plannedFacts, plannedMembers = idx, ver
			p := m.plan(facts, members)
			m.planned.Add(1)
			if applied == nil || !reflect.DeepEqual(p, *applied) || time.Since(appliedAt) >= resyncEvery {
				err := m.apply(p)
				if msg := fmt.Sprint(err); err != nil && msg != lastErr {
					m.cfg.Logger.Warn("configuring the mesh device", "err", err)
				}
				lastErr = fmt.Sprint(err)
				if err == nil {
					var before []netmesh.Peer
					if applied != nil {
						before = applied.cfg.Peers
					}
					m.logPeerChanges(before, p.cfg.Peers)
				}
				applied, appliedAt = &p, time.Now()
				if err != nil {
					applied = nil // again at the next wake-up
				}
			}
		}
		m.considered.Add(1)
		var ticked <-chan time.Time
		if versioned == nil || applied == nil || m.keepPending() {
			ticked = tick.C
		}
		resync.Reset(time.Until(appliedAt.Add(resyncEvery)))
		select {
		case <-ctx.Done():
			if err := m.flushKept(); err != nil {
				m.cfg.Logger.Warn("keeping the mesh peers", "err", err)
			}
			return
		case <-changed:
		case <-gossipMoved:
		case <-resync.C:
		case <-ticked:
			if time.Since(m.keptAtTime()) >= keepEvery {
				if err := m.flushKept(); err != nil {
					m.cfg.Logger.Warn("keeping the mesh peers", "err", err)
				}
			}
		}
	}
}

// peerChange is a peer added to the device, taken off it, or given a new
// endpoint.
type peerChange struct {
	Change string // added, removed or endpoint
	Peer   netmesh.Peer
}

// peerChanges lists what differs between two peer sets but the allowed
// IPs (service IPs come and go with every move): a pure function.
func peerChanges(before, after []netmesh.Peer) []peerChange {
	had := map[wgtypes.Key]netmesh.Peer{}
	for _, p := range before {
		had[p.PublicKey] = p
	}
	var out []peerChange
	for _, p := range after {
		old, ok := had[p.PublicKey]
		switch {
		case !ok:
			out = append(out, peerChange{"added", p})
		case old.Endpoint != p.Endpoint:
			out = append(out, peerChange{"endpoint", p})
		}
		delete(had, p.PublicKey)
	}
	for _, p := range before {
		if _, gone := had[p.PublicKey]; gone {
			out = append(out, peerChange{"removed", p})
		}
	}
	return out
}

// logPeerChanges tells the operator which peers the device gained, lost
// or reaches at a new endpoint: a pair of machines that cannot reach each
// other is first looked for here.
func (m *Mesh) logPeerChanges(before, after []netmesh.Peer) {
	for _, c := range peerChanges(before, after) {
		var overlay string
		if len(c.Peer.AllowedIPs) > 0 {
			overlay = c.Peer.AllowedIPs[0].Addr().String()
		}
		m.cfg.Logger.Info("mesh peer "+c.Change, "key", c.Peer.PublicKey.String(), "overlay", overlay, "endpoint", c.Peer.Endpoint.String())
	}
}

// keepPending tells whether peers wait to be written to PeersFile.
func (m *Mesh) keepPending() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.toKeep != nil && !bytes.Equal(m.toKeep, m.saved)
}

func (m *Mesh) keptAtTime() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.keptAt
}

// membersVersioned is gossip that tells when its view changed
// (cluster.Node); without it Run plans on every wake-up, every second.
type membersVersioned interface {
	MembersVersion() uint64
	// MembersChanged is closed when the version next grows.
	MembersChanged() <-chan struct{}
}

// resyncEvery is how often Run sets the device even though its plan did
// not change.
const resyncEvery = 30 * time.Second

// Self is this machine as its device config needs it.
type Self struct {
	ID      string
	Key     wgtypes.Key
	Port    int
	Overlay netip.Addr // zero until known
	Prefix  netip.Prefix
}

// Desired computes the device's config: a peer for every machine the
// facts register, except this one, departed ones and removed ones. Gossip
// gives a registered machine's endpoint only: its key is bound at
// registration and its overlay address allocated by the facts, so a key
// holder gossiping a made-up machine or address becomes no peer. Only a
// newcomer whose own registration has not reached it yet (it has no
// Raft, which runs over the mesh) takes its first peers from gossip. A
// peer's allowed IPs are its overlay address and the service IPs of the
// services it owns.
func Desired(s *fsm.State, gossip []cluster.Member, self Self) netmesh.Config {
	type peerInfo struct{ key, endpoint, overlay string }
	infos := map[string]peerInfo{}
	serviceIPs := map[string][]netip.Prefix{}
	for _, sv := range s.Services() {
		serviceIPs[sv.MachineID] = append(serviceIPs[sv.MachineID], netip.PrefixFrom(sv.ServiceIP, sv.ServiceIP.BitLen()))
	}
	for _, f := range s.Machines() {
		if f.State == fsm.MachineGone {
			continue
		}
		pi := peerInfo{key: f.WGPublicKey, endpoint: f.WGEndpoint}
		if f.OverlayIP.IsValid() {
			pi.overlay = f.OverlayIP.String()
		}
		infos[f.ID] = pi
	}
	_, member := s.Machine(self.ID)
	for _, g := range gossip {
		if g.Liveness == cluster.LivenessLeft {
			delete(infos, g.MachineID)
			continue
		}
		f, registered := s.Machine(g.MachineID)
		switch {
		case registered && cluster.ImpostorOf(f, g):
			continue // another key claims a registered machine: the facts' peer stays
		case !registered && member:
			continue // not admitted: no peer of a member
		}
		pi, known := infos[g.MachineID]
		if !registered {
			pi.key, pi.overlay = g.WGPublicKey, g.OverlayIP
		}
		if g.WGEndpoint != "" {
			pi.endpoint = g.WGEndpoint
		}
		if known || !registered {
			infos[g.MachineID] = pi
		}
	}
	cfg := netmesh.Config{PrivateKey: self.Key, ListenPort: self.Port}
	if self.Overlay.IsValid() {
		cfg.Address = netip.PrefixFrom(self.Overlay, self.Prefix.Bits())
	}
	for id, pi := range infos {
		if id == self.ID {
			continue
		}
		key, err := wgtypes.ParseKey(pi.key)
		if err != nil {
			continue
		}
		p := netmesh.Peer{PublicKey: key, KeepAlive: keepAlive}
		if ep, err := netip.ParseAddrPort(pi.endpoint); err == nil {
			p.Endpoint = ep
		}
		if o, err := netip.ParseAddr(pi.overlay); err == nil {
			p.AllowedIPs = []netip.Prefix{netip.PrefixFrom(o, o.BitLen())}
		}
		// Routing follows the fact: a service IP goes to its owner.
		p.AllowedIPs = append(p.AllowedIPs, serviceIPs[id]...)
		cfg.Peers = append(cfg.Peers, p)
	}
	// In a fixed order, so equal plans compare equal (Run).
	slices.SortFunc(cfg.Peers, func(a, b netmesh.Peer) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return cfg
}
