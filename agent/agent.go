// Package agent is droverd's composition root: it wires the cluster node,
// the local control API and (as they land) the mesh, the runtime and the
// executors, and owns their lifecycle.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
)

// Config is droverd's configuration, filled from flags by cmd/droverd.
type Config struct {
	Name        string
	DataDir     string
	Socket      string
	SocketGroup string // group allowed on the ctl socket, when it exists

	BindAddr   netip.Addr // underlay address for gossip
	GossipPort int
	RaftPort   int
	RPCPort    int

	WGInterface   string       // WireGuard interface name (unique per machine)
	WGPort        int          // WireGuard UDP port on the underlay
	OverlayPrefix netip.Prefix // the mesh's address range

	DockerHost    string       // the local Docker engine, e.g. unix:///var/run/docker.sock
	ZFSParent     string       // parent dataset of volumes; empty: this machine holds none
	ServicePrefix netip.Prefix // range of service IPs

	Init           bool     // bootstrap a new cluster if this machine has none
	Join           []string // gossip addresses of members to join
	ClusterKeyFile string   // key file to use instead of the one in DataDir

	// LockLease is the lease of a namespace lock held by a deploy or a
	// migration (renewed while it runs; 60 s when zero).
	LockLease time.Duration
	// StallTimeout fails a volume stream that moved no byte for this long
	// (30 s when zero).
	StallTimeout time.Duration
	// SafetyWindow is how long a migration's source keeps its copy (72 h
	// when zero).
	SafetyWindow time.Duration
	// JanitorInterval is how often migrations nobody runs, leftovers and
	// expired copies are looked for (5 s when zero).
	JanitorInterval time.Duration

	Version string
	Timing  cluster.Timing
	Logger  *slog.Logger
}

func (c *Config) setDefaults() {
	if c.LockLease == 0 {
		c.LockLease = 60 * time.Second
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = 30 * time.Second
	}
	if c.SafetyWindow == 0 {
		c.SafetyWindow = 72 * time.Hour
	}
	if c.JanitorInterval == 0 {
		c.JanitorInterval = 5 * time.Second
	}
}

// Agent is the running daemon; it implements the ctl API's backend.
type Agent struct {
	cfg       Config
	logger    *slog.Logger
	machineID string

	mu      sync.Mutex
	node    *cluster.Node      // nil until this machine is in a cluster
	mesh    *meshState         // nil until this machine is in a cluster
	overlay netip.Addr         // zero until known
	endNode context.CancelFunc // stops the goroutines serving the node
	work    *workloads
	execs   map[string]*execution // migrations this daemon runs, by id
	drains  map[string]*drainRun  // drains this daemon runs, by machine id

	crashAt   string // test hook: the crash point to die at (CrashPointEnv)
	crashFile string // test hook: a file naming it (CrashPointFileEnv)

	ctx context.Context // the daemon's lifetime
	wg  sync.WaitGroup
}

// Run runs the daemon until ctx is cancelled, which is the normal way to
// stop it (SIGTERM); it then leaves the cluster cleanly and returns nil.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cfg.setDefaults()
	if cfg.Name == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("no --name and no hostname: %w", err)
		}
		cfg.Name = h
	}
	if !cfg.BindAddr.IsValid() {
		return errors.New("a bind address (--bind) is required")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	id, err := loadOrCreateMachineID(cfg.DataDir)
	if err != nil {
		return err
	}
	a := &Agent{cfg: cfg, logger: cfg.Logger.With("machine", cfg.Name), machineID: id, ctx: ctx,
		execs: map[string]*execution{}, drains: map[string]*drainRun{}, crashAt: os.Getenv(CrashPointEnv), crashFile: os.Getenv(CrashPointFileEnv)}
	if a.crashHooked() {
		a.logger.Warn("test crash hook set: this daemon kills itself at the named point", "point", a.crashAt, "file", a.crashFile)
	}
	defer a.wg.Wait()

	key, err := a.configuredKey()
	if err != nil {
		return err
	}

	ln, err := ctlapi.Listen(cfg.Socket, cfg.SocketGroup)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	srv := &http.Server{Handler: ctlapi.NewHandler(a, a.logger), ReadHeaderTimeout: 10 * time.Second}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.logger.Error("control API stopped", "err", err)
		}
	}()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		os.Remove(cfg.Socket)
	}()

	switch {
	case key != nil:
		if err := a.startCluster(key, cfg.Init, cfg.Join); err != nil {
			return err
		}
	case cfg.Init:
		if _, err := a.initCluster(); err != nil {
			return err
		}
	default:
		a.logger.Info("this machine is in no cluster yet: run `droverctl cluster init` here, or `droverctl cluster join TOKEN`")
	}
	defer a.leave()

	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		a.logger.Warn("sd_notify READY failed", "err", err)
	}
	a.logger.Info("droverd ready", "socket", cfg.Socket, "id", id, "version", cfg.Version)
	a.wg.Add(1)
	go a.reportStatus()

	select {
	case <-ctx.Done():
		daemon.SdNotify(false, daemon.SdNotifyStopping)
		a.logger.Info("stopping")
		return nil
	case <-a.halted():
		return fmt.Errorf("fact store halted: %w", a.currentNode().HaltErr())
	}
}

// configuredKey finds the cluster key: the --cluster-key-file, else the
// one kept in the data dir; nil when this machine has none yet.
func (a *Agent) configuredKey() ([]byte, error) {
	if a.cfg.ClusterKeyFile != "" {
		key, err := readKeyFile(a.cfg.ClusterKeyFile)
		if err == nil && key == nil {
			err = fmt.Errorf("cluster key file %s does not exist", a.cfg.ClusterKeyFile)
		}
		return key, err
	}
	return readKeyFile(filepath.Join(a.cfg.DataDir, clusterKeyFile))
}

func (a *Agent) currentNode() *cluster.Node {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.node
}

// halted is closed when the cluster node halts; never, while there is none.
func (a *Agent) halted() <-chan struct{} {
	if n := a.currentNode(); n != nil {
		return n.Halted()
	}
	return nil
}

// startCluster starts gossip and Raft with key and joins the cluster:
// the machines it knew before, then the given addresses. Joining goes on in
// the background until some machine answers.
func (a *Agent) startCluster(key []byte, bootstrap bool, join []string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.node != nil {
		return errors.New("this machine is already in a cluster")
	}
	n, err := cluster.Start(cluster.Config{
		MachineID:     a.machineID,
		Name:          a.cfg.Name,
		DataDir:       a.cfg.DataDir,
		BindAddr:      a.cfg.BindAddr,
		GossipPort:    a.cfg.GossipPort,
		RaftPort:      a.cfg.RaftPort,
		RPCPort:       a.cfg.RPCPort,
		Key:           key,
		OverlayPrefix: a.cfg.OverlayPrefix,
		Timing:        a.cfg.Timing,
		Logger:        a.logger,
	})
	if err != nil {
		return err
	}
	m, err := a.openMesh()
	if err != nil {
		n.Close()
		return err
	}
	endpoint := netip.AddrPortFrom(a.cfg.BindAddr, uint16(a.cfg.WGPort))
	if err := n.SetMeta(func(meta *cluster.Meta) {
		meta.WGPublicKey = m.key.PublicKey().String()
		meta.WGEndpoint = endpoint.String()
	}); err != nil {
		m.dev.Close()
		n.Close()
		return err
	}
	w, err := a.openWorkloads()
	if err != nil {
		m.dev.Close()
		n.Close()
		return err
	}
	a.registerMigrationRPC(n)
	ctx, cancel := context.WithCancel(a.ctx)
	a.node, a.mesh, a.endNode, a.work = n, m, cancel, w
	// Raft and RPC start on the overlay address once it is known (bringUp).
	a.wg.Add(5)
	go a.keepJoining(ctx, n, join)
	go a.bringUp(ctx, n, m, bootstrap, join)
	go a.runMesh(ctx, n, m)
	go a.runWorkloads(ctx, n, w)
	go a.runMigrationJanitor(ctx, n)
	if a.crashHooked() {
		a.wg.Add(1)
		go a.watchCrashPhases(ctx, n)
	}
	return nil
}

// keepJoining joins known peers and the given addresses, retrying with
// backoff until one answers or the daemon stops.
func (a *Agent) keepJoining(ctx context.Context, n *cluster.Node, addrs []string) {
	defer a.wg.Done()
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

// stopCluster closes the node without leaving; used when a join failed.
func (a *Agent) stopCluster() {
	a.mu.Lock()
	n, m, end, w := a.node, a.mesh, a.endNode, a.work
	a.node, a.mesh, a.endNode, a.work = nil, nil, nil, nil
	a.mu.Unlock()
	if end != nil {
		end()
	}
	if w != nil {
		w.rt.Close()
	}
	if n != nil {
		n.Close()
	}
	if m != nil {
		m.dev.Close()
	}
}

// leave departs the cluster cleanly: leadership handed over, gossip told.
func (a *Agent) leave() {
	n := a.currentNode()
	if n == nil {
		return
	}
	if err := n.Leave(5 * time.Second); err != nil {
		a.logger.Warn("leaving the cluster", "err", err)
	}
	if err := n.Close(); err != nil {
		a.logger.Warn("closing the cluster node", "err", err)
	}
	a.mu.Lock()
	m, end, w := a.mesh, a.endNode, a.work
	a.mu.Unlock()
	if end != nil {
		end()
	}
	if w != nil {
		w.rt.Close()
	}
	if m != nil {
		m.dev.Close()
	}
}

// reportStatus sends the Raft role to systemd whenever it changes.
func (a *Agent) reportStatus() {
	defer a.wg.Done()
	last := ""
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		status := "not in a cluster"
		if n := a.currentNode(); n != nil {
			if st, err := n.Status(); err == nil {
				status = fmt.Sprintf("raft %s, leader %s, term %d", st.Role, a.nameOf(st.LeaderID), st.Term)
			}
		}
		if status != last {
			daemon.SdNotify(false, "STATUS="+status)
			last = status
		}
		select {
		case <-a.ctx.Done():
			return
		case <-tick.C:
		}
	}
}
