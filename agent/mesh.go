package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/atomicfile"
	"github.com/drover-sh/drover/netmesh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

const (
	wgKeyFile     = "wg.key"
	overlayIPFile = "overlay-ip"
	// keepAlive keeps every pair of machines handshaken, also those that
	// exchange no Raft traffic, so a broken path shows before it is needed.
	keepAlive = 25 * time.Second
)

// meshState is this machine's part of the mesh.
type meshState struct {
	dev *netmesh.Device
	key wgtypes.Key
}

func (a *Agent) openMesh() (*meshState, error) {
	key, err := netmesh.LoadOrCreateKey(filepath.Join(a.cfg.DataDir, wgKeyFile))
	if err != nil {
		return nil, err
	}
	dev, err := netmesh.Open(a.cfg.WGInterface, a.logger)
	if err != nil {
		return nil, err
	}
	return &meshState{dev: dev, key: key}, nil
}

// savedOverlay is the overlay address this machine had before a restart.
func (a *Agent) savedOverlay() netip.Addr {
	b, err := os.ReadFile(filepath.Join(a.cfg.DataDir, overlayIPFile))
	if err != nil {
		return netip.Addr{}
	}
	addr, err := netip.ParseAddr(strings.TrimSpace(string(b)))
	if err != nil || !a.cfg.OverlayPrefix.Contains(addr) {
		a.logger.Warn("ignoring the saved overlay address", "file", overlayIPFile, "content", string(b))
		return netip.Addr{}
	}
	return addr
}

// bringUp waits for this machine's overlay address (its own from before a
// restart; the first of the range when it bootstraps; otherwise allocated
// by the leader and learned over gossip), puts it on the device, and only
// then starts Raft and RPC on it.
func (a *Agent) bringUp(ctx context.Context, n *cluster.Node, m *meshState, bootstrap bool, join []string) {
	defer a.wg.Done()
	overlay := a.savedOverlay()
	if !overlay.IsValid() && bootstrap {
		if has, _ := n.HasRaftState(); !has {
			overlay = a.cfg.OverlayPrefix.Masked().Addr().Next()
		}
	}
	for !overlay.IsValid() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
		if overlay = n.OverlayIP(); overlay.IsValid() {
			break
		}
		// A full state sync with any member brings the allocation.
		if _, err := n.RejoinKnown(); err != nil || len(join) > 0 {
			n.Join(join)
		}
	}
	a.logger.Info("overlay address known", "overlay", overlay)
	if err := atomicfile.Write(filepath.Join(a.cfg.DataDir, overlayIPFile), []byte(overlay.String()+"\n"), 0o600); err != nil {
		a.logger.Error("saving overlay address", "err", err)
	}
	a.setOverlay(overlay)
	if err := m.dev.Set(a.meshConfig(n, m)); err != nil {
		a.logger.Error("configuring the mesh device", "err", err)
	}
	if err := n.StartRaft(overlay); err != nil {
		a.logger.Error("starting Raft on the overlay", "overlay", overlay, "err", err)
		return
	}
	if err := n.SetMeta(func(meta *cluster.Meta) { meta.OverlayIP = overlay.String() }); err != nil {
		a.logger.Warn("gossiping the overlay address", "err", err)
	}
	if bootstrap {
		made, err := n.Bootstrap()
		if err != nil {
			a.logger.Error("bootstrapping the cluster", "err", err)
			return
		}
		if made {
			a.logger.Info("bootstrapped a new cluster", "overlay", overlay)
		}
	}
}

func (a *Agent) setOverlay(addr netip.Addr) {
	a.mu.Lock()
	a.overlay = addr
	a.mu.Unlock()
}

func (a *Agent) currentOverlay() netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.overlay
}

// runMesh keeps the device's peers in line with membership and facts:
// at once when the facts change (a service IP follows its service within
// a tick of the commit that moved it), and every second for gossip.
func (a *Agent) runMesh(ctx context.Context, n *cluster.Node, m *meshState) {
	defer a.wg.Done()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var lastErr string
	var factsAt uint64
	var setAt time.Time
	for {
		if idx := n.FactsIndex(); idx != factsAt || time.Since(setAt) >= time.Second {
			factsAt, setAt = idx, time.Now()
			err := m.dev.Set(a.meshConfig(n, m))
			if msg := fmt.Sprint(err); err != nil && msg != lastErr {
				a.logger.Warn("configuring the mesh device", "err", err)
			}
			lastErr = fmt.Sprint(err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// meshConfig computes the device's config: a peer for every machine known
// from the facts or gossip, except this one, departed ones and removed
// ones; gossip, being fresher, wins over the facts. A peer's allowed IPs
// are its overlay address and the service IPs of the services it owns.
func (a *Agent) meshConfig(n *cluster.Node, m *meshState) netmesh.Config {
	type peerInfo struct{ key, endpoint, overlay string }
	infos := map[string]peerInfo{}
	serviceIPs := map[string][]netip.Prefix{}
	n.Read(func(s *fsm.State) {
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
	})
	for _, g := range n.Members() {
		if g.Liveness == cluster.LivenessLeft {
			delete(infos, g.MachineID)
			continue
		}
		pi := infos[g.MachineID]
		if g.WGPublicKey != "" {
			pi.key = g.WGPublicKey
		}
		if g.WGEndpoint != "" {
			pi.endpoint = g.WGEndpoint
		}
		if g.OverlayIP != "" {
			pi.overlay = g.OverlayIP
		}
		infos[g.MachineID] = pi
	}
	cfg := netmesh.Config{PrivateKey: m.key, ListenPort: a.cfg.WGPort}
	if o := a.currentOverlay(); o.IsValid() {
		cfg.Address = netip.PrefixFrom(o, a.cfg.OverlayPrefix.Bits())
	}
	for id, pi := range infos {
		if id == a.machineID {
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
	return cfg
}

// errNoMesh: the mesh is not up on this machine yet.
var errNoMesh = errors.New("the mesh is not up on this machine yet")

// meshStatus reads the device.
func (a *Agent) meshStatus(context.Context) (netmesh.Status, error) {
	a.mu.Lock()
	m := a.mesh
	a.mu.Unlock()
	if m == nil {
		return netmesh.Status{}, errNoMesh
	}
	return m.dev.Status()
}
