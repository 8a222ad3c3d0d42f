package mesh

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
	"github.com/drover-sh/drover/netmesh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func key(t *testing.T) wgtypes.Key {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

type fakeDevice struct {
	mu   sync.Mutex
	sets []netmesh.Config
	err  error
}

func (d *fakeDevice) Set(cfg netmesh.Config) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sets = append(d.sets, cfg)
	return d.err
}
func (d *fakeDevice) Status() (netmesh.Status, error) { return netmesh.Status{Name: "fake"}, nil }
func (d *fakeDevice) Close() error                    { return nil }

func (d *fakeDevice) last() netmesh.Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sets[len(d.sets)-1]
}

func peersByKey(cfg netmesh.Config) map[string]netmesh.Peer {
	out := map[string]netmesh.Peer{}
	for _, p := range cfg.Peers {
		out[p.PublicKey.String()] = p
	}
	return out
}

// The config computed from facts and gossip: a peer per other machine,
// gossip fresher than facts, departed and removed machines left out, and
// each service IP routed to the machine that owns the service.
func TestDesiredFollowsFactsAndGossip(t *testing.T) {
	st := facttest.NewStore()
	kb, kc, kd, kself := key(t).PublicKey(), key(t).PublicKey(), key(t).PublicKey(), key(t)
	keys := map[string]wgtypes.Key{"a": kself.PublicKey(), "b": kb, "c": kc, "d": kd}
	for _, id := range []string{"a", "b", "c", "d"} { // overlay addresses in this order
		k := keys[id]
		st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: id, Name: id, WGPublicKey: k.String(), WGEndpoint: "192.0.2.1:51820"}, At: facttest.T0})
		st.Must(t, fsm.AllocateOverlayIP{MachineID: id, Prefix: netip.MustParsePrefix("10.210.0.0/16"), At: facttest.T0})
	}
	sv := st.Deploy(t, "shop", fsm.ServiceSpec{Name: "web", Image: "img"}, "b")
	st.Must(t, fsm.SetMachineState{ID: "d", State: fsm.MachineDrained, At: facttest.T0})
	st.Must(t, fsm.RemoveMachine{ID: "d", At: facttest.T0})
	gossip := []cluster.Member{
		{Meta: cluster.Meta{MachineID: "b", WGEndpoint: "192.0.2.2:51999"}, Liveness: cluster.LivenessAlive},
		{Meta: cluster.Meta{MachineID: "c"}, Liveness: cluster.LivenessLeft},
	}
	var cfg netmesh.Config
	st.Read(func(s *fsm.State) {
		cfg = Desired(s, gossip, Self{ID: "a", Key: kself, Port: 51820, Overlay: netip.MustParseAddr("10.210.0.1"), Prefix: netip.MustParsePrefix("10.210.0.0/16")})
	})
	peers := peersByKey(cfg)
	if len(peers) != 1 {
		t.Fatalf("peers %v: want only b (c left, d removed, a is this machine)", cfg.Peers)
	}
	b := peers[kb.String()]
	if b.Endpoint.String() != "192.0.2.2:51999" || b.KeepAlive != keepAlive {
		t.Fatalf("b's endpoint %s: gossip's should win", b.Endpoint)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.210.0.2/32"), netip.PrefixFrom(sv.ServiceIP, 32)}
	if !slices.Equal(b.AllowedIPs, want) {
		t.Fatalf("b's allowed IPs %v, want %v", b.AllowedIPs, want)
	}
	if cfg.Address.String() != "10.210.0.1/16" || cfg.ListenPort != 51820 {
		t.Fatalf("device address %s port %d", cfg.Address, cfg.ListenPort)
	}
}

func TestRunSetsTheDeviceWhenFactsChange(t *testing.T) {
	st := facttest.NewStore()
	dev := &fakeDevice{err: errors.New("device busy")}
	m := New(Config{Self: "a", Port: 51820, Prefix: netip.MustParsePrefix("10.210.0.0/16"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, dev, key(t))
	m.SetOverlay(netip.MustParseAddr("10.210.0.1"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx, st, facttest.NewMembers()) }()
	time.Sleep(50 * time.Millisecond)
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "b", Name: "b", WGPublicKey: key(t).PublicKey().String()}, At: facttest.T0})
	deadline := time.Now().Add(5 * time.Second)
	for len(dev.last().Peers) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if len(dev.last().Peers) != 1 || m.Overlay().String() != "10.210.0.1" {
		t.Fatalf("the device did not follow the facts: %+v", dev.last())
	}
	if _, err := m.Status(); err != nil || m.PublicKey() == "" {
		t.Fatal("status or key missing")
	}
}

// A key holder announcing a registered machine's id with its own key
// changes no peer: the key is bound when the machine is registered.
func TestForgedGossipIdentityChangesNoPeer(t *testing.T) {
	st := facttest.NewStore()
	realKey, forged, self := key(t).PublicKey(), key(t).PublicKey(), key(t)
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "b", Name: "b", WGPublicKey: realKey.String(), WGEndpoint: "192.0.2.2:51820"}, At: facttest.T0})
	gossip := []cluster.Member{{Meta: cluster.Meta{MachineID: "b", WGPublicKey: forged.String(), WGEndpoint: "198.51.100.9:51820", OverlayIP: "10.210.9.9"}, Liveness: cluster.LivenessAlive}}
	var cfg netmesh.Config
	st.Read(func(s *fsm.State) { cfg = Desired(s, gossip, Self{ID: "a", Key: self}) })
	peers := peersByKey(cfg)
	if _, ok := peers[forged.String()]; ok || len(peers) != 1 {
		t.Fatalf("peers %v: the forged key got in", cfg.Peers)
	}
	if p := peers[realKey.String()]; p.Endpoint.String() != "192.0.2.2:51820" || len(p.AllowedIPs) != 0 {
		t.Fatalf("b's peer took the forged claim: %+v", p)
	}
}

// A key holder that gossips a machine the facts never admitted, with an
// overlay address of its choosing, becomes no peer of a member; a
// newcomer, whose facts do not hold it yet, takes its first peers from
// gossip (it has no other way to reach Raft).
func TestUnadmittedGossipMachineIsNoPeerOfAMember(t *testing.T) {
	st := facttest.NewStore()
	kb, stranger, self := key(t).PublicKey(), key(t).PublicKey(), key(t)
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "a", Name: "a", WGPublicKey: self.PublicKey().String()}, At: facttest.T0})
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "b", Name: "b", WGPublicKey: kb.String(), WGEndpoint: "192.0.2.2:51820"}, At: facttest.T0})
	gossip := []cluster.Member{{Meta: cluster.Meta{MachineID: "x", WGPublicKey: stranger.String(), WGEndpoint: "198.51.100.9:51820", OverlayIP: "10.210.0.2"}, Liveness: cluster.LivenessAlive}}
	var cfg netmesh.Config
	st.Read(func(s *fsm.State) { cfg = Desired(s, gossip, Self{ID: "a", Key: self}) })
	if peers := peersByKey(cfg); len(peers) != 1 || peers[kb.String()].PublicKey != kb {
		t.Fatalf("a member's peers %v: want b only", cfg.Peers)
	}

	empty := facttest.NewStore()
	empty.Read(func(s *fsm.State) { cfg = Desired(s, gossip, Self{ID: "n", Key: key(t)}) })
	if p := peersByKey(cfg)[stranger.String()]; len(p.AllowedIPs) != 1 || p.AllowedIPs[0].String() != "10.210.0.2/32" {
		t.Fatalf("a newcomer's peers %v: want the gossiped machine", cfg.Peers)
	}
}

// fakeLocal records the service IPs it was last given.
type fakeLocal struct {
	mu  sync.Mutex
	ips []netip.Addr
}

func (l *fakeLocal) Set(ips []netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ips = slices.Clone(ips)
	return nil
}

func (l *fakeLocal) get() []netip.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.ips)
}

// A commit that moves a service here puts its IP on this machine, woken
// by the store rather than found by a poll; one that moves it away takes
// it off.
func TestRunHoldsTheServiceIPsOfOwnedServices(t *testing.T) {
	st := facttest.NewStore()
	st.AddMachine(t, "a", "a")
	st.AddMachine(t, "b", "b")
	local, dev := &fakeLocal{}, &fakeDevice{}
	m := New(Config{Self: "a", Port: 51820, Prefix: netip.MustParsePrefix("10.210.0.0/16"), Local: local,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, dev, key(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx, st, facttest.NewMembers()) }()
	defer func() { cancel(); <-done }()
	waitFor := func(want []netip.Addr) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !slices.Equal(local.get(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("local service IPs %v, want %v", local.get(), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	mine := st.Deploy(t, "shop", fsm.ServiceSpec{Name: "web", Image: "img"}, "a")
	st.Deploy(t, "shop", fsm.ServiceSpec{Name: "db", Image: "img"}, "b")
	waitFor([]netip.Addr{mine.ServiceIP})
	now := time.Now()
	st.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "test/move", Lease: time.Hour, At: now})
	st.Must(t, fsm.StartMigration{ID: "m1", Namespace: "shop", Service: "web", TargetID: "b", Holder: "test/move", At: now})
	st.Must(t, fsm.AdvanceMigration{ID: "m1", Phase: fsm.PhaseTargetStarting, At: now})
	// Once the loop has gone through a wake-up begun after the target
	// started, a still holds the IP: not before the commit.
	seen := m.considered.Load()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if m.considered.Load() > seen+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the mesh did not sync after the target started")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got := local.get(); !slices.Equal(got, []netip.Addr{mine.ServiceIP}) {
		t.Fatalf("before the commit, a holds %v", got)
	}
	st.Must(t, fsm.CommitMigration{ID: "m1", Holder: "test/move", At: now})
	waitFor(nil)
}

// A restarted daemon's device gets the peers kept from before at once,
// before its facts are back; once the facts hold the machine, they alone
// decide, and what they decide is kept for the next restart.
func TestPeersKeptAcrossARestart(t *testing.T) {
	dir := t.TempDir()
	st := facttest.NewStore()
	bKey := key(t).PublicKey()
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "a", Name: "a", WGPublicKey: key(t).PublicKey().String()}, At: facttest.T0})
	st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "b", Name: "b", WGPublicKey: bKey.String(), WGEndpoint: "192.0.2.2:51820",
		OverlayIP: netip.MustParseAddr("10.210.0.2")}, At: facttest.T0})
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	before := New(Config{Self: "a", Port: 51820, Prefix: netip.MustParsePrefix("10.210.0.0/16"), Logger: logger}, &fakeDevice{}, key(t))
	before.peersPath = filepath.Join(dir, PeersFile)
	if err := before.Sync(st, facttest.NewMembers()); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(before.peersPath)
	if err != nil {
		t.Fatalf("peers not kept: %v", err)
	}
	kept, err := decodePeers(b)
	if err != nil || len(kept) != 1 || kept[0].PublicKey != bKey || kept[0].Endpoint.String() != "192.0.2.2:51820" {
		t.Fatalf("kept peers %+v, %v", kept, err)
	}

	// After the restart: no facts yet, no gossip.
	dev := &fakeDevice{}
	after := New(Config{Self: "a", Port: 51820, Prefix: netip.MustParsePrefix("10.210.0.0/16"), Logger: logger}, dev, key(t))
	after.peersPath, after.kept = before.peersPath, kept
	if err := after.Sync(facttest.NewStore(), facttest.NewMembers()); err != nil {
		t.Fatal(err)
	}
	if got := dev.last().Peers; len(got) != 1 || got[0].PublicKey != bKey || got[0].KeepAlive == 0 {
		t.Fatalf("device after the restart, before the facts: %+v", got)
	}
	// The facts are back and no longer hold b: the kept peer goes.
	back := facttest.NewStore()
	back.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "a", Name: "a", WGPublicKey: key(t).PublicKey().String()}, At: facttest.T0})
	if err := after.Sync(back, facttest.NewMembers()); err != nil {
		t.Fatal(err)
	}
	if got := dev.last().Peers; len(got) != 0 {
		t.Fatalf("device once the facts are back: %+v", got)
	}
	if b, _ := os.ReadFile(after.peersPath); strings.TrimSpace(string(b)) != "[]" {
		t.Fatalf("kept after the facts came back: %s", b)
	}
}

// Run touches the device only when what it should hold changes: equal
// facts and gossip give an equal plan (the peers in a fixed order), and
// a new machine gives another.
func TestRunSetsTheDeviceOnlyWhenThePlanChanges(t *testing.T) {
	st := facttest.NewStore()
	register := func(id string) {
		st.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: id, Name: id, WGPublicKey: key(t).PublicKey().String(), WGEndpoint: "192.0.2.1:51820"}, At: facttest.T0})
	}
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		register(id)
	}
	dev := &fakeDevice{}
	m := New(Config{Self: "a", Port: 51820, Prefix: netip.MustParsePrefix("10.210.0.0/16"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, dev, key(t))
	members := facttest.NewMembers()
	first := m.plan(st, members)
	if len(first.cfg.Peers) != 4 {
		t.Fatalf("%d peers planned, want 4", len(first.cfg.Peers))
	}
	for range 20 {
		if again := m.plan(st, members); !reflect.DeepEqual(first, again) {
			t.Fatalf("two plans of the same facts differ:\n%+v\n%+v", first.cfg.Peers, again.cfg.Peers)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx, st, members) }()
	defer func() { cancel(); <-done }()
	sets := func() int {
		dev.mu.Lock()
		defer dev.mu.Unlock()
		return len(dev.sets)
	}
	waitConsidered := func(n int64) { t.Helper(); waitWakeUps(t, m, n) }
	waitConsidered(3) // the first, then two one-second ticks
	if got := sets(); got != 1 {
		t.Fatalf("the device was set %d times for unchanged facts, want once", got)
	}
	register("f")
	seen := m.considered.Load()
	waitConsidered(seen + 2)
	if got := sets(); got != 2 {
		t.Fatalf("the device was set %d times after a machine joined, want 2", got)
	}
}

// versionedMembers is gossip that says when it changed.
type versionedMembers struct {
	gossip  *facttest.Members
	mu      sync.Mutex
	version uint64
	moved   chan struct{}
}

func (v *versionedMembers) Members() []cluster.Member { return v.gossip.Members() }

func (v *versionedMembers) MembersVersion() uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.version
}

func (v *versionedMembers) MembersChanged() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.moved
}

func (v *versionedMembers) change() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.version++
	close(v.moved)
	v.moved = make(chan struct{})
}

// With gossip that says when it changed, Run neither wakes nor plans
// while neither the facts nor gossip moved, and plans when one does.
func TestRunWakesOnlyWhenFactsOrGossipMove(t *testing.T) {
	st := facttest.NewStore()
	st.AddMachine(t, "a", "a")
	members := &versionedMembers{gossip: facttest.NewMembers(), moved: make(chan struct{})}
	m := New(Config{Self: "a", Port: 51820, Prefix: netip.MustParsePrefix("10.210.0.0/16"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, &fakeDevice{}, key(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx, st, members) }()
	defer func() { cancel(); <-done }()
	waitWakeUps(t, m, 1)
	// Longer than the one-second tick of gossip that does not say.
	time.Sleep(2500 * time.Millisecond)
	if got, plans := m.considered.Load(), m.planned.Load(); got != 1 || plans != 1 {
		t.Fatalf("%d wake-ups and %d plans while nothing moved, want 1 and 1", got, plans)
	}
	members.change()
	waitWakeUps(t, m, 2)
	if got := m.planned.Load(); got != 2 {
		t.Fatalf("%d plans after gossip moved, want 2", got)
	}
	st.AddMachine(t, "b", "b")
	waitWakeUps(t, m, 3)
	if got := m.planned.Load(); got != 3 {
		t.Fatalf("%d plans after the facts moved, want 3", got)
	}
}

// waitWakeUps waits until Run has gone through n wake-ups.
func waitWakeUps(t *testing.T, m *Mesh, n int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for m.considered.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("Run went through %d wake-ups, want %d", m.considered.Load(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var _ membersVersioned = (*cluster.Node)(nil) // the agent gives Run its node

func TestPeerChangesNameAddedRemovedAndMovedPeersNotNewServiceIPs(t *testing.T) {
	stays, moves, goes, comes := key(t), key(t), key(t), key(t)
	ep := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	overlay := netip.MustParsePrefix("10.210.0.2/32")
	before := []netmesh.Peer{
		{PublicKey: stays, Endpoint: ep("10.77.0.2:51820"), AllowedIPs: []netip.Prefix{overlay}},
		{PublicKey: moves, Endpoint: ep("10.77.0.3:51820")},
		{PublicKey: goes, Endpoint: ep("10.77.0.4:51820")},
	}
	after := []netmesh.Peer{
		{PublicKey: stays, Endpoint: ep("10.77.0.2:51820"), AllowedIPs: []netip.Prefix{overlay, netip.MustParsePrefix("10.211.0.1/32")}},
		{PublicKey: moves, Endpoint: ep("10.77.0.9:51820")},
		{PublicKey: comes},
	}
	got := map[wgtypes.Key]string{}
	for _, c := range peerChanges(before, after) {
		got[c.Peer.PublicKey] = c.Change
	}
	want := map[wgtypes.Key]string{moves: "endpoint", goes: "removed", comes: "added"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("changes %v, want %v", got, want)
	}
	if c := peerChanges(after, after); len(c) != 0 {
		t.Errorf("no change listed as %+v", c)
	}
}
