package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/deploy"
	"github.com/drover-sh/drover/agent/dns"
	"github.com/drover-sh/drover/agent/drain"
	"github.com/drover-sh/drover/agent/images"
	"github.com/drover-sh/drover/agent/keyring"
	"github.com/drover-sh/drover/agent/membership"
	"github.com/drover-sh/drover/agent/mesh"
	"github.com/drover-sh/drover/agent/migrate"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/reconcile"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/agent/secrets"
	"github.com/drover-sh/drover/agent/servicectl"
	"github.com/drover-sh/drover/agent/servicelogs"
	"github.com/drover-sh/drover/agent/standby"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/internal/atomicfile"
	"github.com/drover-sh/drover/internal/hostmem"
	"github.com/drover-sh/drover/internal/loopback"
	"github.com/drover-sh/drover/netmesh"
	"github.com/drover-sh/drover/volume"
)

// overlayIPFile keeps this machine's overlay address across restarts.
const overlayIPFile = "overlay-ip"

// parts are what this machine runs while it is in a cluster. They are
// made together, and stopped together by stopCluster.
type parts struct {
	node    *cluster.Node
	mesh    *mesh.Mesh
	rt      *runtime.Docker
	vols    *volume.ZFS // nil when this machine has no ZFS parent
	mig     *migrate.Migrator
	drains  *drain.Drainer
	deploy  *deploy.Deployer
	recon   *reconcile.Reconciler
	rm      *membership.Remover
	keys    *keyring.Keeper
	images  *images.Pusher
	logs    *servicelogs.Logs
	svcs    *servicectl.Services
	secrets *secrets.Keeper
	dns     *dns.Server // nil: no DNS
	standby *standby.Standby

	ctx context.Context    // the parts' lifetime: the daemon's, until stopCluster
	end context.CancelFunc // ends ctx
	wg  sync.WaitGroup     // the loops started by startCluster
}

// startCluster starts gossip and Raft with key, makes the parts, and
// joins the cluster: the machines it knew before, then the given
// addresses. Joining goes on in the background until some machine
// answers.
func (a *Agent) startCluster(keys [][]byte, bootstrap bool, join []string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.parts != nil {
		return errors.New("this machine is already in a cluster")
	}
	p, err := a.makeParts(keys)
	if err != nil {
		return err
	}
	a.parts = p
	// Raft and RPC start on the overlay address once it is known (bringUp).
	p.wg.Add(6)
	go func() { defer p.wg.Done(); p.secrets.Run(p.ctx) }()
	p.wg.Add(1)
	go func() { defer p.wg.Done(); p.standby.Run(p.ctx) }()
	if p.dns != nil {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if err := p.dns.Run(p.ctx, nil); err != nil {
				a.logger.Error("DNS stopped", "addr", a.cfg.DNSAddr, "err", err)
			}
		}()
	}
	go func() { defer p.wg.Done(); a.keepJoining(p.ctx, p.node, join) }()
	go func() { defer p.wg.Done(); p.keys.Run(p.ctx) }()
	go func() { defer p.wg.Done(); a.bringUp(p.ctx, p, bootstrap, join) }()
	go func() { defer p.wg.Done(); p.mesh.Run(p.ctx, p.node, p.node) }()
	go func() { defer p.wg.Done(); p.recon.Run(p.ctx) }()
	p.mig.Start()
	p.drains.Start()
	return nil
}

// makeParts opens node, mesh, runtime and volumes, and wires the parts on
// them; their routes are registered here, before Raft and RPC start.
func (a *Agent) makeParts(keys [][]byte) (*parts, error) {
	cfg := a.cfg
	device := cfg.WGInterface
	if cfg.OpenOverlay {
		a.logger.Warn("--open-overlay-ports: Raft and RPC accept any process that reaches the overlay address, not only peers of the mesh")
		device = ""
	}
	n, err := cluster.Start(cluster.Config{
		MachineID: a.machineID, Name: cfg.Name, DataDir: cfg.DataDir, BindAddr: cfg.BindAddr,
		GossipPort: cfg.GossipPort, RaftPort: cfg.RaftPort, RPCPort: cfg.RPCPort, Key: keys[0], SecondaryKeys: keys[1:], Device: device,
		OverlayPrefix: cfg.OverlayPrefix, Timing: cfg.Timing, Logger: a.logger, Observer: a.metrics, OnChange: a.events.Applied,
	})
	if err != nil {
		return nil, err
	}
	p := &parts{node: n}
	fail := func(err error) (*parts, error) {
		p.close()
		return nil, err
	}
	lo := loopback.Addresses{Prefix: cfg.ServicePrefix}
	meshCfg := mesh.Config{Self: a.machineID, Port: cfg.WGPort, Prefix: cfg.OverlayPrefix, Logger: a.logger}
	if cfg.ServicePrefix.IsValid() {
		meshCfg.Local = lo
	}
	if p.mesh, err = mesh.Open(meshCfg, cfg.DataDir, cfg.WGInterface); err != nil {
		return fail(err)
	}
	endpoint := netip.AddrPortFrom(cfg.BindAddr, uint16(cfg.WGPort))
	if err := n.SetMeta(func(meta *cluster.Meta) {
		meta.WGPublicKey = p.mesh.PublicKey()
		meta.WGEndpoint = endpoint.String()
	}); err != nil {
		return fail(err)
	}
	wgKey, err := netmesh.LoadOrCreateKey(filepath.Join(cfg.DataDir, mesh.KeyFile))
	if err != nil {
		return fail(err)
	}
	p.secrets = secrets.New(secrets.Config{Self: a.machineID, Name: cfg.Name, LockLease: cfg.LockLease, Logger: a.logger, PrivateKey: wgKey}, n, n)
	secretsDir := filepath.Join(cfg.DataDir, "secrets") // a tmpfs, mounted when a service first needs it
	var resolver netip.Addr
	if cfg.DNSAddr != "" {
		ap, err := netip.ParseAddrPort(cfg.DNSAddr)
		if err != nil {
			return fail(fmt.Errorf("--dns-addr %q: want IP:PORT: %w", cfg.DNSAddr, err))
		}
		if err := ensureLocalAddr(ap.Addr()); err != nil {
			return fail(fmt.Errorf("--dns-addr %s: %w", cfg.DNSAddr, err))
		}
		p.dns = dns.New(dns.Config{Addr: cfg.DNSAddr, Upstreams: dns.Upstreams("/etc/resolv.conf", ap.Addr()),
			LocalSource: dns.ContainerSource(), Logger: a.logger}, n)
		if ap.Port() == 53 {
			resolver = ap.Addr() // containers' resolvers can only be told an address: port 53
		}
	}
	if p.rt, err = runtime.NewDocker(runtime.DockerConfig{Resolver: resolver, Host: cfg.DockerHost, MachineID: a.machineID, MachineName: cfg.Name,
		Credentials: runtime.Credentials{File: cfg.RegistryAuthFile}, AliasFile: filepath.Join(cfg.DataDir, "image-aliases.json"),
		HoldBinary: cfg.HoldBinary, HoldDir: filepath.Join(cfg.DataDir, "held"), Secrets: p.secrets, SecretsDir: secretsDir}); err != nil {
		return fail(err)
	}
	if cfg.ZFSParent != "" {
		if p.vols, err = volume.NewZFS(cfg.ZFSParent); err != nil {
			return fail(fmt.Errorf("volumes under %s: %w", cfg.ZFSParent, err))
		}
	}
	ctx, cancel := context.WithCancel(a.ctx)
	p.ctx, p.end = ctx, cancel
	if cfg.ServicePrefix.IsValid() {
		// A migration's target publishes ports on a service IP it holds
		// only from the commit on (see agent/migrate).
		if err := loopback.AllowNonlocalBind(); err != nil {
			return fail(err)
		}
	}
	deps := migrate.Deps{Facts: n, Members: n, Peers: n, Server: peer.Server{Mux: n, IDs: n},
		Containers: p.rt, Starter: p.rt, Images: p.rt, Loopback: lo, Holder: p.rt}
	var reconVols reconcile.Volumes
	if p.vols != nil {
		deps.Streams, deps.Datasets, deps.Copies = p.vols, p.vols, p.vols
		reconVols = p.vols
	}
	p.mig = migrate.New(ctx, migrate.Config{Self: a.machineID, Name: cfg.Name, LockLease: cfg.LockLease,
		StallTimeout: cfg.StallTimeout, SafetyWindow: cfg.SafetyWindow, JanitorInterval: cfg.JanitorInterval,
		Logger: a.logger, Crash: a.crash, MemAvailable: hostmem.Available, Observer: a.metrics}, deps)
	p.drains = drain.New(ctx, drain.Config{Self: a.machineID, ExecutorGrace: cfg.LockLease, Interval: cfg.JanitorInterval, Logger: a.logger, Observer: a.metrics}, n, n, p.mig)
	p.images = images.New(a.machineID, p.rt, n, n, a.logger)
	p.logs = servicelogs.New(n, n, n, p.rt)
	var svcVols servicectl.Volumes
	if p.vols != nil {
		svcVols = p.vols
	}
	p.svcs = servicectl.New(servicectl.Config{Self: a.machineID, Name: cfg.Name, LockLease: cfg.LockLease, Logger: a.logger}, n, n, n, p.rt, svcVols)
	p.deploy = deploy.New(deploy.Config{Self: a.machineID, Name: cfg.Name, ServicePrefix: cfg.ServicePrefix, LockLease: cfg.LockLease,
		BindPrefixes: cfg.AllowBind, Logger: a.logger, Volumes: p.svcs}, n, n, p.mig, p.rt, p.images)
	var sbVols standby.Volumes
	if p.vols != nil {
		sbVols = p.vols
	}
	p.standby = standby.New(standby.Config{Self: a.machineID, Name: cfg.Name, Logger: a.logger, Observer: a.metrics}, n, n, n, sbVols, p.rt)
	p.standby.Register(peer.Server{Mux: n, IDs: n})
	p.recon = reconcile.New(reconcile.Config{Self: a.machineID, Logger: a.logger, MemAvailable: hostmem.Available, Observer: a.metrics, Fence: p.standby, Busy: p.svcs.Busy}, n, p.rt, reconVols, lo, n)
	p.keys = &keyring.Keeper{Facts: n, Gossip: n, Logger: a.logger,
		Save: func(keys [][]byte) error { return saveKeys(cfg.DataDir, keys) }}
	p.images.Register(peer.Server{Mux: n, IDs: n})
	p.rm = membership.New(a.machineID, n, n, n, a.logger, a.forgetCluster)
	p.mig.Register()
	p.logs.Register(peer.Server{Mux: n, IDs: n})
	p.svcs.Register(peer.Server{Mux: n, IDs: n})
	p.rm.Register(peer.Server{Mux: n, IDs: n})
	return p, nil
}

// close releases what makeParts opened, in reverse.
func (p *parts) close() {
	if p.rt != nil {
		p.rt.Close()
	}
	if p.node != nil {
		p.node.Close()
	}
	if p.mesh != nil {
		p.mesh.Close()
	}
}

// stopCluster is the one teardown: the parts' goroutines are stopped and
// waited for, and node, runtime and mesh closed. With leave, the cluster
// is told first (leadership handed over, gossip told we leave); without,
// as after a failed join, the node just closes. Workloads are never
// touched.
func (a *Agent) stopCluster(leave bool) {
	a.mu.Lock()
	p := a.parts
	a.parts = nil
	a.mu.Unlock()
	if p == nil {
		return
	}
	if leave {
		if err := p.node.Leave(5 * time.Second); err != nil {
			a.logger.Warn("leaving the cluster", "err", err)
		}
	}
	if err := p.node.Close(); err != nil {
		a.logger.Warn("closing the cluster node", "err", err)
	}
	p.end()
	p.wg.Wait()
	p.mig.Wait()
	p.drains.Wait()
	p.rt.Close()
	p.mesh.Close()
}

// keepJoining joins known peers and the given addresses, retrying with
// backoff until one answers or the daemon stops.
func (a *Agent) keepJoining(ctx context.Context, n *cluster.Node, addrs []string) {
	backoff := time.Second
	for {
		joined, err := n.RejoinKnown()
		if joined == 0 && len(addrs) > 0 {
			joined, err = n.Join(addrs)
		}
		if joined > 0 || (err == nil && len(addrs) == 0) {
			if joined > 0 {
				a.logger.Info("joined the cluster's gossip", "contacted", joined)
			}
			return
		}
		a.logger.Warn("could not join the cluster yet; retrying", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
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
func (a *Agent) bringUp(ctx context.Context, p *parts, bootstrap bool, join []string) {
	n := p.node
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
	p.mesh.SetOverlay(overlay)
	if err := p.mesh.Sync(n, n); err != nil {
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

// forgetCluster is what a machine does when it is removed: in the
// background (the answer to the machine that asked goes out first), it
// leaves the cluster and forgets it — key, Raft state, known peers,
// overlay address, its machine id and WireGuard key — so that a restart
// does not bring it back: it comes up as a new machine in no cluster.
func (a *Agent) forgetCluster(from string) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		time.Sleep(100 * time.Millisecond) // let the answer go out
		a.logger.Warn("this machine was removed from the cluster: leaving and forgetting it", "asked_by", a.nameOf(from))
		a.stopCluster(true)
		a.mu.Lock()
		a.forgotten = true
		a.mu.Unlock()
		// The cluster revoked this machine's id and WireGuard key: a
		// restart makes new ones, under which it may join again.
		var errs []error
		for _, name := range []string{clusterKeyFile, "peers.json", overlayIPFile, "raft", machineIDFile, mesh.KeyFile, mesh.PeersFile} {
			if err := os.RemoveAll(filepath.Join(a.cfg.DataDir, name)); err != nil {
				errs = append(errs, err)
			}
		}
		if err := errors.Join(errs...); err != nil {
			a.logger.Error("forgetting the cluster", "err", err)
		}
	}()
}

// ensureLocalAddr puts ip on the loopback unless the host has it: the
// resolver's address is the same on every machine.
func ensureLocalAddr(ip netip.Addr) error {
	if ip.IsLoopback() || ip.IsUnspecified() {
		return nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return fmt.Errorf("listing the host's addresses: %w", err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if have, ok := netip.AddrFromSlice(n.IP); ok && have.Unmap() == ip {
				return nil
			}
		}
	}
	return loopback.Addresses{}.Add(ip)
}
