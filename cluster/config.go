package cluster

import (
	"errors"
	"fmt"
	"github.com/drover-sh/drover/fsm"
	"log/slog"
	"net/netip"
	"time"
)

// KeySize is the length of the cluster key: the memberlist AES-256 key
// that every machine of a cluster shares.
const KeySize = 32

// Default ports on the underlay (gossip) and the overlay (Raft, RPC).
const (
	DefaultGossipPort = 7946
	DefaultRaftPort   = 7947
	DefaultRPCPort    = 7948
)

// Observer counts the fact store's work.
type Observer interface {
	Committed(time.Duration)
	LeaderChanged()
}

// Config is what a Node needs; the agent fills it from flags.
type Config struct {
	// Observer, when set, is told each command's commit latency on this
	// machine and each change of leader it sees (agent/metrics).
	Observer Observer
	// OnChange, when set, is called with each command that changed the
	// facts, in log order, on every machine (agent/events); it runs under
	// the fact store's lock and must be quick.
	OnChange  func(index uint64, c fsm.Command, s *fsm.State)
	MachineID string
	Name      string
	DataDir   string // Raft log, snapshots and known peers live under it

	BindAddr   netip.Addr // underlay address gossip binds to and advertises
	GossipPort int
	RaftPort   int
	RPCPort    int

	Key []byte // cluster key, KeySize bytes: the gossip key this machine encrypts with
	// SecondaryKeys are further gossip keys it decrypts with (during a
	// rotation).
	SecondaryKeys [][]byte

	// Device, when set, is the WireGuard interface: Raft and the RPC
	// server accept only connections that arrive over it from a peer of
	// the mesh (see guard.go). Empty in tests on loopback.
	Device string

	// OverlayPrefix, when set, is the mesh range the leader allocates
	// machines' overlay addresses from.
	OverlayPrefix netip.Prefix

	// MaxServers is how many machines the leader keeps in the Raft
	// configuration, voters and non-voters together (default 7: five
	// voters and two ready to replace one); the others follow the facts
	// from a server. The leader's value counts.
	MaxServers int

	Timing Timing
	Logger *slog.Logger
	Now    func() time.Time // injected clock; time.Now when nil
}

// Timing holds the knobs that tests turn down. Zero values mean the
// production defaults.
type Timing struct {
	// GossipProbeInterval, when set, switches memberlist to its
	// local-network profile with this probe interval.
	GossipProbeInterval time.Duration
	// RaftHeartbeat, when set, scales Raft's heartbeat, election and
	// leader-lease timeouts together.
	RaftHeartbeat time.Duration
	// StabilizationTime is how long a new server must be healthy before
	// it is promoted to voter (default 10s).
	StabilizationTime time.Duration
	// DeadServerAfter is how long a voter must be failed or gone before
	// it is demoted in favour of a healthy non-voter (default 5m).
	DeadServerAfter time.Duration
	// ReconcileInterval is how often the leader compares gossip with
	// Raft membership and the fact store (default 2s).
	ReconcileInterval time.Duration
	// ReconnectInterval is how often a machine tries to reach members it
	// sees as failed, so a healed partition heals gossip too (default 10s).
	ReconnectInterval time.Duration
}

func (t Timing) withDefaults() Timing {
	if t.StabilizationTime == 0 {
		t.StabilizationTime = 10 * time.Second
	}
	if t.DeadServerAfter == 0 {
		t.DeadServerAfter = 5 * time.Minute
	}
	if t.ReconcileInterval == 0 {
		t.ReconcileInterval = 2 * time.Second
	}
	if t.ReconnectInterval == 0 {
		t.ReconnectInterval = 10 * time.Second
	}
	return t
}

// DefaultMaxServers is MaxServers when unset.
const DefaultMaxServers = 7

func (c Config) maxServers() int {
	if c.MaxServers > 0 {
		return c.MaxServers
	}
	return DefaultMaxServers
}

// ErrNoKey is returned when a node is started without a usable key.
var ErrNoKey = errors.New("no cluster key")

func (c *Config) validate() error {
	if c.MachineID == "" || c.Name == "" {
		return errors.New("cluster config: machine id and name are required")
	}
	if c.DataDir == "" {
		return errors.New("cluster config: data dir is required")
	}
	if !c.BindAddr.IsValid() {
		return errors.New("cluster config: bind address is required")
	}
	if len(c.Key) != KeySize {
		return fmt.Errorf("cluster key must be %d bytes, got %d: %w", KeySize, len(c.Key), ErrNoKey)
	}
	for i, k := range c.SecondaryKeys {
		if len(k) != KeySize {
			return fmt.Errorf("secondary cluster key %d must be %d bytes, got %d: %w", i+1, KeySize, len(k), ErrNoKey)
		}
	}
	if c.GossipPort == 0 {
		c.GossipPort = DefaultGossipPort
	}
	if c.RaftPort == 0 {
		c.RaftPort = DefaultRaftPort
	}
	if c.RPCPort == 0 {
		c.RPCPort = DefaultRPCPort
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	c.Timing = c.Timing.withDefaults()
	return nil
}
