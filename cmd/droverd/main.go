// Command droverd is drover's daemon: one per machine.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/drover-sh/drover/agent"
	"github.com/drover-sh/drover/cluster"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "droverd: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("droverd", flag.ContinueOnError)
	var (
		cfg       agent.Config
		bind      = fs.String("bind", "", "underlay address for gossip (default: the first non-loopback IPv4 address)")
		join      = fs.String("join", "", "comma-separated gossip addresses (host[:port]) of machines to join")
		logLevel  = fs.String("log-level", "info", "debug, info, warn or error")
		fastTimer = fs.Bool("lab-timing", false, "fast failure detection and promotion, for labs and tests only")
		showVer   = fs.Bool("version", false, "print the version and exit")
		overlay   = fs.String("overlay-prefix", "10.210.0.0/16", "the mesh's overlay address range")
		services  = fs.String("service-prefix", "10.211.0.0/16", "the range service IPs are allocated from")
	)
	fs.StringVar(&cfg.Name, "name", "", "this machine's name, a DNS label (default: the hostname)")
	fs.StringVar(&cfg.DataDir, "data-dir", "/var/lib/drover", "directory for state: identity, keys, Raft log")
	fs.StringVar(&cfg.Socket, "socket", "/run/drover/drover.sock", "path of the local control socket")
	fs.StringVar(&cfg.SocketGroup, "socket-group", "drover", "group given access to the control socket, when it exists")
	fs.IntVar(&cfg.GossipPort, "gossip-port", cluster.DefaultGossipPort, "gossip port (TCP and UDP) on the underlay")
	fs.IntVar(&cfg.RaftPort, "raft-port", cluster.DefaultRaftPort, "Raft port")
	fs.IntVar(&cfg.RPCPort, "rpc-port", cluster.DefaultRPCPort, "daemon-to-daemon RPC port")
	fs.StringVar(&cfg.WGInterface, "wg-interface", "drover0", "WireGuard interface name")
	fs.BoolVar(&cfg.OpenOverlay, "open-overlay-ports", false, "accept Raft and RPC from any process that reaches the overlay address, not only from peers of the mesh: only for machines that share one network namespace (tests)")
	fs.IntVar(&cfg.WGPort, "wg-port", 51820, "WireGuard UDP port on the underlay")
	fs.StringVar(&cfg.DockerHost, "docker-host", "unix:///var/run/docker.sock", "the local Docker engine")
	fs.StringVar(&cfg.RegistryAuthFile, "registry-auth", "", "registry logins in Docker's config.json form, for pulls (read at each use; never replicated)")
	fs.StringVar(&cfg.DNSAddr, "dns-addr", "169.254.77.53:53", "where droverd answers SERVICE.NAMESPACE.drover (UDP and TCP), and the resolver containers get; put on the loopback when the host lacks it (empty: no DNS)")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", "127.0.0.1:9477", "where /metrics answers for Prometheus (empty: nowhere); on the loopback unless told otherwise")
	fs.StringVar(&cfg.HoldBinary, "hold-binary", besideMe("drover-hold"), "drover-hold (static), with which a move's target holds the service's container started before the cutover; empty: start it at the cutover")
	fs.StringVar(&cfg.ZFSParent, "zfs-parent", "", "parent ZFS dataset of volumes, e.g. tank/drover (empty: this machine holds no volumes)")
	fs.BoolVar(&cfg.Init, "init", false, "start a new cluster here if this machine is in none")
	fs.Func("allow-bind", "a host directory under which services may bind-mount host paths (repeat for more; none by default)", func(v string) error {
		if !strings.HasPrefix(v, "/") || path.Clean(v) != v || v == "/" {
			return fmt.Errorf("%q: want an absolute, clean directory other than /", v)
		}
		cfg.AllowBind = append(cfg.AllowBind, v)
		return nil
	})
	fs.StringVar(&cfg.ClusterKeyFile, "cluster-key-file", "", "file holding the base64 cluster key, used when the data dir holds none (with --init: the new cluster's key)")
	fs.StringVar(&cfg.JoinTokenFile, "join-token-file", "", "join the cluster this token names at start, when this machine is in none (as `droverctl cluster join --token-file`)")
	fs.DurationVar(&cfg.SafetyWindow, "safety-window", 72*time.Hour, "how long the source of a migration keeps its copy for a rollback")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *showVer {
		fmt.Println(version)
		return nil
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg.Version = version
	var err error
	if cfg.OverlayPrefix, err = netip.ParsePrefix(*overlay); err != nil || cfg.OverlayPrefix != cfg.OverlayPrefix.Masked() {
		return fmt.Errorf("--overlay-prefix %q: want a network like 10.210.0.0/16", *overlay)
	}
	if cfg.ServicePrefix, err = netip.ParsePrefix(*services); err != nil || cfg.ServicePrefix != cfg.ServicePrefix.Masked() || cfg.ServicePrefix.Overlaps(cfg.OverlayPrefix) {
		return fmt.Errorf("--service-prefix %q: want a network like 10.211.0.0/16, apart from the overlay", *services)
	}
	if cfg.BindAddr, err = bindAddr(*bind); err != nil {
		return err
	}
	for _, a := range strings.Split(*join, ",") {
		if a = strings.TrimSpace(a); a != "" {
			if _, _, err := net.SplitHostPort(a); err != nil {
				a = net.JoinHostPort(a, fmt.Sprint(cfg.GossipPort))
			}
			cfg.Join = append(cfg.Join, a)
		}
	}
	if *fastTimer {
		cfg.Timing = cluster.Timing{
			GossipProbeInterval: 300 * time.Millisecond,
			RaftHeartbeat:       500 * time.Millisecond,
			StabilizationTime:   time.Second,
			DeadServerAfter:     10 * time.Second,
			ReconcileInterval:   500 * time.Millisecond,
			ReconnectInterval:   2 * time.Second,
		}
		cfg.LockLease, cfg.StallTimeout, cfg.JanitorInterval = 15*time.Second, 5*time.Second, time.Second
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return agent.Run(ctx, cfg)
}

func bindAddr(flagValue string) (netip.Addr, error) {
	if flagValue != "" {
		a, err := netip.ParseAddr(flagValue)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("--bind: %w", err)
		}
		return a, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("listing addresses for --bind: %w", err)
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, errors.New("no non-loopback IPv4 address found: give --bind")
}

// besideMe is the program name in this executable's directory, when it is
// there; empty otherwise.
func besideMe(name string) string {
	self, err := os.Executable()
	if err != nil {
		return ""
	}
	p := filepath.Join(filepath.Dir(self), name)
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}
