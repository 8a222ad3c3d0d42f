// Package agent is droverd's composition root: it wires the cluster node,
// the local control API, the mesh, the container runtime, the volumes and
// the parts that do the work (reconcile, migrate, drain, deploy), owns
// their lifetimes, and serves the control API's read views.
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
	"github.com/drover-sh/drover/agent/events"
	"github.com/drover-sh/drover/agent/metrics"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/internal/crashpoint"
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

	WGInterface string // WireGuard interface name (unique per machine)
	WGPort      int    // WireGuard UDP port on the underlay
	// OpenOverlay lets any process that reaches the overlay address talk
	// to Raft and RPC, not only peers of the mesh: only for machines that
	// share one network namespace, which are each other's local processes.
	OpenOverlay   bool
	OverlayPrefix netip.Prefix // the mesh's address range

	DockerHost string // the local Docker engine, e.g. unix:///var/run/docker.sock
	// RegistryAuthFile holds registry logins in Docker's config.json form;
	// read at each pull, never put in the facts.
	RegistryAuthFile string
	// HoldBinary is drover-hold, with which a move's target starts the
	// service's container before the cutover and only execs the service
	// at it; empty: the target starts the container at the cutover.
	HoldBinary string
	// MetricsAddr is where /metrics answers (Prometheus); empty: nowhere.
	MetricsAddr string
	// DNSAddr is where drover answers SERVICE.NAMESPACE.drover (UDP and
	// TCP), and the resolver containers are given; empty: no DNS. An
	// address the host lacks is put on its loopback.
	DNSAddr       string
	ZFSParent     string       // parent dataset of volumes; empty: this machine holds none
	ServicePrefix netip.Prefix // range of service IPs

	// AllowBind are the host directories under which a manifest may bind
	// host paths into containers; none: no binds.
	AllowBind []string

	Init           bool     // bootstrap a new cluster if this machine has none
	Join           []string // gossip addresses of members to join
	ClusterKeyFile string   // key file to use when DataDir holds none
	// JoinTokenFile holds a join token this machine joins with at start
	// when it is in no cluster yet (as `droverctl cluster join` would).
	JoinTokenFile string

	// LockLease is the lease of a namespace lock held by a deploy or a
	// migration (renewed while it runs; 60 s when zero).
	LockLease time.Duration
	// StallTimeout fails a volume stream that moved no byte for this long
	// (30 s when zero).
	StallTimeout time.Duration
	// SafetyWindow is how long a migration's source keeps its copy (72 h
	// when zero).
	SafetyWindow time.Duration
	// JanitorInterval is how often migrations nobody runs, leftovers,
	// expired copies and drains to resume are looked for (5 s when zero).
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
	crash     *crashpoint.Points

	metrics *metrics.Metrics
	events  *events.Log // the changes of the facts, kept across parts

	mu        sync.Mutex
	parts     *parts // nil until this machine is in a cluster
	forgotten bool   // removed from its cluster: init and join wait for a restart

	ctx context.Context // the daemon's lifetime
	wg  sync.WaitGroup  // goroutines of the daemon itself
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
	logger := cfg.Logger.With("machine", cfg.Name)
	// The daemon's own goroutines end with this context, also when Run
	// ends because the fact store halted and nobody cancelled the caller's.
	ctx, cancel := context.WithCancel(ctx)
	a := &Agent{cfg: cfg, logger: logger, machineID: id, ctx: ctx, crash: crashpoint.FromEnv(logger), metrics: metrics.New(), events: events.New()}
	defer a.wg.Wait()
	defer cancel()
	a.metrics.Watch(func() (metrics.Members, metrics.Mesh) {
		p := a.current()
		if p == nil {
			return nil, nil
		}
		return p.node, p.mesh
	})
	if cfg.MetricsAddr != "" {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			if err := a.metrics.Serve(ctx, cfg.MetricsAddr, a.logger); err != nil {
				a.logger.Error("metrics endpoint stopped", "addr", cfg.MetricsAddr, "err", err)
			}
		}()
	}

	keys, err := a.configuredKeys()
	if err != nil {
		return err
	}
	if cfg.Init && keys != nil {
		if err := a.refuseReinit(); err != nil {
			return err
		}
	}

	ln, err := ctlapi.Listen(cfg.Socket, cfg.SocketGroup)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	srv := &http.Server{Handler: ctlapi.NewHandler(a, a.logger), ReadHeaderTimeout: 10 * time.Second, ConnContext: ctlapi.PeerContext}
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
		if err := ln.Remove(); err != nil {
			a.logger.Warn("control socket", "err", err)
		}
	}()

	switch {
	case keys != nil:
		if cfg.JoinTokenFile != "" {
			a.logger.Info("this machine is in a cluster already: --join-token-file is not used", "file", cfg.JoinTokenFile)
		}
		if err := a.startCluster(keys, cfg.Init, cfg.Join); err != nil {
			return err
		}
	case cfg.Init:
		if _, err := a.initCluster(); err != nil {
			return err
		}
	case cfg.JoinTokenFile != "":
		if err := a.joinFromFile(ctx, cfg.JoinTokenFile); err != nil {
			return err
		}
	default:
		a.logger.Info("this machine is in no cluster yet: run `droverctl cluster init` here, or `droverctl cluster join --token-file FILE`")
	}
	defer a.stopCluster(true)

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
		err := fmt.Errorf("fact store halted: %w", a.currentNode().HaltErr())
		a.logger.Error("stopping: the fact store halted; restart droverd once the entry is understood", "err", err)
		a.stopWithin(haltTeardown)
		return err
	}
}

// haltTeardown bounds the teardown after the fact store halted: the daemon
// exits then, so that systemd's restart fires and the operator sees it.
const haltTeardown = 15 * time.Second

// stopWithin stops the cluster parts without leaving (a halted node hands
// nothing over) and gives up waiting after d: a part stuck on a halted
// store must not keep the daemon from exiting.
func (a *Agent) stopWithin(d time.Duration) {
	done := make(chan struct{})
	go func() { // not the daemon's wait group's: the process may exit before it ends
		defer close(done)
		a.stopCluster(false)
	}()
	select {
	case <-done:
	case <-time.After(d):
		a.logger.Error("the teardown after the halt did not end in time; exiting anyway", "after", d)
	}
}

// ErrReinit: --init over a data dir that was in a cluster and lost its
// Raft state.
var ErrReinit = errors.New("refusing to bootstrap a new cluster over an earlier one")

// refuseReinit refuses --init when the data dir shows this machine was in
// a cluster (it kept an overlay address) but its Raft state is gone: a
// new cluster would start silently under the old key and machine id.
func (a *Agent) refuseReinit() error {
	if _, err := os.Stat(filepath.Join(a.cfg.DataDir, overlayIPFile)); err != nil {
		return nil // never had an address: a first start
	}
	if fi, err := os.Stat(filepath.Join(a.cfg.DataDir, "raft", "raft.db")); err == nil && fi.Size() > 0 {
		return nil // its Raft state is there: --init changes nothing
	}
	return fmt.Errorf("%s was in a cluster (it has %s and a cluster key) but its Raft state is gone: %w; start without --init to rejoin that cluster, or remove the data dir to start a new one",
		a.cfg.DataDir, overlayIPFile, ErrReinit)
}

// configuredKeys finds the gossip keys, the primary first: those kept in
// the data dir (they follow key rotations), else the --cluster-key-file;
// nil when this machine has none yet.
func (a *Agent) configuredKeys() ([][]byte, error) {
	keys, err := readKeyFile(filepath.Join(a.cfg.DataDir, clusterKeyFile))
	if err != nil || keys != nil || a.cfg.ClusterKeyFile == "" {
		return keys, err
	}
	keys, err = readKeyFile(a.cfg.ClusterKeyFile)
	if err == nil && keys == nil {
		err = fmt.Errorf("cluster key file %s does not exist", a.cfg.ClusterKeyFile)
	}
	return keys, err
}

func (a *Agent) current() *parts {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.parts
}

func (a *Agent) currentNode() *cluster.Node {
	if p := a.current(); p != nil {
		return p.node
	}
	return nil
}

// halted is closed when the cluster node halts; never, while there is none.
func (a *Agent) halted() <-chan struct{} {
	if n := a.currentNode(); n != nil {
		return n.Halted()
	}
	return nil
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
