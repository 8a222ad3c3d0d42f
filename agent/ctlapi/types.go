// Package ctlapi is the local control API of droverd: HTTP over a unix
// socket under /v1/. It holds the wire types, the server plumbing the
// daemon mounts, and the client that droverctl and the tests use.
package ctlapi

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// APIVersion is sent by both sides in the VersionHeader; a mismatch is
// refused with both versions named.
const (
	APIVersion    = "1"
	VersionHeader = "Drover-Api-Version"
)

// DefaultSocket is where droverd listens unless told otherwise.
const DefaultSocket = "/run/drover/drover.sock"

// Machine is one row of `machine ls`.
type Machine struct {
	ID          string     `json:"id"`
	Name        string     `json:"name"`
	GossipAddr  string     `json:"gossip_addr"`
	OverlayIP   string     `json:"overlay_ip,omitempty"`
	State       string     `json:"state"`     // active, draining, drained, gone; joining before registration; removed for a machine back under a removed identity (refused)
	Liveness    string     `json:"liveness"`  // alive, suspect, failed, left, unknown
	RaftRole    string     `json:"raft_role"` // leader, voter, nonvoter, observer, none
	LastContact *time.Time `json:"last_contact,omitempty"`
	WGPublicKey string     `json:"wg_public_key,omitempty"`
	// Drain is the machine's latest drain, if it had one.
	Drain *DrainInfo `json:"drain,omitempty"`
	// LastHandshake is this machine's last WireGuard handshake with it.
	LastHandshake *time.Time `json:"last_handshake,omitempty"`
}

// MeshPeer is one peer of this machine's WireGuard device.
type MeshPeer struct {
	Machine       string     `json:"machine,omitempty"`
	PublicKey     string     `json:"public_key"`
	Endpoint      string     `json:"endpoint"`
	AllowedIPs    []string   `json:"allowed_ips"`
	LastHandshake *time.Time `json:"last_handshake,omitempty"`
	RxBytes       int64      `json:"rx_bytes"`
	TxBytes       int64      `json:"tx_bytes"`
}

// Event is one change of the facts, as every machine applied it.
type Event struct {
	Index   uint64    `json:"index"` // the Raft log index: the order
	Time    time.Time `json:"time"`  // when its proposer stamped it
	Kind    string    `json:"kind"`  // machine, deploy, service, migration, drain, cluster
	Subject string    `json:"subject"`
	Message string    `json:"message"`
}

// EventsRequest asks for the events this machine kept; with Follow, the
// ones to come too.
type EventsRequest struct {
	Follow bool `json:"follow,omitempty"`
}

// EventsEnd ends an events stream.
type EventsEnd struct{}

// RemoveResult is what `deploy rm NAMESPACE` did.
type RemoveResult struct {
	Namespace   string   `json:"namespace"`
	Services    []string `json:"services"`     // removed, with where they ran
	VolumesKept []string `json:"volumes_kept"` // with their owners
	// VolumesDestroyed: with --volumes, the volumes whose datasets their
	// owners destroyed.
	VolumesDestroyed []string `json:"volumes_destroyed,omitempty"`
}

// RemoveRequest asks `deploy rm` to destroy the volumes too.
type RemoveRequest struct {
	Volumes bool `json:"volumes,omitempty"`
}

// RestartResult is what `service restart` did.
type RestartResult struct {
	Service string   `json:"service"`
	Machine string   `json:"machine"`
	Took    Duration `json:"took"` // from the stop to ready again
}

// LogsRequest asks for a service's log ("namespace/name"): the lines
// after Since (zero: from the start), the last Tail of them (0: all),
// and with Follow the lines to come, across moves, until the caller
// stops.
type LogsRequest struct {
	Service string    `json:"service"`
	Since   time.Time `json:"since,omitzero"`
	Tail    int       `json:"tail,omitempty"`
	Follow  bool      `json:"follow,omitempty"`
}

// LogLine is one line of a service's log and the machine it ran on.
type LogLine struct {
	Time    time.Time `json:"time"`
	Machine string    `json:"machine"`
	Stream  string    `json:"stream"` // stdout or stderr
	Text    string    `json:"text"`
}

// LogsResult ends a log: how many lines were passed on.
type LogsResult struct {
	Lines int `json:"lines"`
}

// ViewStatus says whether the facts this machine shows (service ls,
// volume ls, machine ls) may be stale: a machine cut off from the leader
// shows what it last knew.
type ViewStatus struct {
	Stale  bool      `json:"stale"`
	Since  time.Time `json:"since,omitzero"` // when it last knew them current
	Reason string    `json:"reason,omitempty"`
}

// Warning is the line a CLI prints before a stale view; empty when fresh.
func (v ViewStatus) Warning(now time.Time) string {
	if !v.Stale {
		return ""
	}
	if v.Since.IsZero() {
		return "warning: " + v.Reason + ": what follows may be stale"
	}
	return fmt.Sprintf("warning: %s: what follows is as of %s (%s ago) and may be stale",
		v.Reason, v.Since.Local().Format("15:04:05"), now.Sub(v.Since).Round(time.Second))
}

// MeshStatus is `mesh status`: this machine's WireGuard device.
type MeshStatus struct {
	Interface  string     `json:"interface"`
	Kind       string     `json:"kind"` // kernel or userspace
	PublicKey  string     `json:"public_key"`
	ListenPort int        `json:"listen_port"`
	Address    string     `json:"address"`
	Peers      []MeshPeer `json:"peers"`
}

// RaftServer is one member of the Raft configuration.
type RaftServer struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	Address  string `json:"address"`
	Suffrage string `json:"suffrage"` // voter or nonvoter
	Leader   bool   `json:"leader"`
}

// ClusterStatus is `cluster status`.
type ClusterStatus struct {
	Initialized  bool         `json:"initialized"`
	MachineID    string       `json:"machine_id"`
	MachineName  string       `json:"machine_name"`
	Role         string       `json:"role"` // leader, follower, candidate, nonvoter, observer, none
	LeaderID     string       `json:"leader_id,omitempty"`
	LeaderName   string       `json:"leader_name,omitempty"`
	LeaderAddr   string       `json:"leader_addr,omitempty"`
	Term         uint64       `json:"term"`
	CommitIndex  uint64       `json:"commit_index"`
	AppliedIndex uint64       `json:"applied_index"`
	LastIndex    uint64       `json:"last_index"`
	Voters       []RaftServer `json:"voters"`
	NonVoters    []RaftServer `json:"nonvoters"`
	// Follows is the Raft server an observer follows the facts from.
	Follows string `json:"follows,omitempty"`
	// GossipKeys are the fingerprints of the gossip keys this machine has
	// installed, the one it encrypts with first.
	GossipKeys []string `json:"gossip_keys,omitempty"`
}

// JoinTokenRequest asks for a join token.
type JoinTokenRequest struct {
	TTL       time.Duration `json:"ttl_ns,omitempty"` // how long it admits machines; 1 h when zero
	SingleUse bool          `json:"single_use,omitempty"`
}

// JoinToken lets another machine join; it carries the cluster key and a
// join grant's secret.
type JoinToken struct {
	Token     string    `json:"token"`
	ID        string    `json:"id"` // the grant's id, as logs and refusals name it
	ExpiresAt time.Time `json:"expires_at"`
	SingleUse bool      `json:"single_use,omitempty"`
}

// KeyRotation is the outcome of `cluster rotate-key`. Keys are named by
// fingerprint, never shown.
type KeyRotation struct {
	Generation uint64   `json:"generation"`
	OldKey     string   `json:"old_key"`
	NewKey     string   `json:"new_key"`
	Confirmed  []string `json:"confirmed"`
	NotAlive   []string `json:"not_alive"`
}

// JoinRequest asks the daemon to join the cluster a token names.
type JoinRequest struct {
	Token string `json:"token"`
}

// VersionInfo is the daemon's version.
type VersionInfo struct {
	Version    string `json:"version"`
	APIVersion string `json:"api_version"`
}

// ErrorBody is the body of every non-2xx answer.
type ErrorBody struct {
	Error string `json:"error"`
	Code  string `json:"code,omitempty"`
}

// APIError is an error with an HTTP status and a stable code. Backends
// return it for the operator's mistakes; the client returns it for every
// non-2xx answer.
type APIError struct {
	Status int
	Code   string
	Err    error
}

func (e *APIError) Error() string { return e.Err.Error() }
func (e *APIError) Unwrap() error { return e.Err }

// ErrDaemonNotRunning: nothing answers on the socket.
var ErrDaemonNotRunning = errors.New("droverd is not running")

// ErrStreamCut: the answer to a long request ended before its result; the
// work itself may go on in the daemon (or resume when it restarts).
var ErrStreamCut = errors.New("answer cut short")

// ErrVersionMismatch: the CLI and the daemon speak different API versions.
var ErrVersionMismatch = errors.New("API version mismatch")

func versionMismatch(ours, theirs string) error {
	return fmt.Errorf("%w: this side speaks %q, the other %q; use a droverctl that matches droverd", ErrVersionMismatch, ours, theirs)
}

// DeployRequest carries a manifest as written; the daemon parses it.
type DeployRequest struct {
	File     string `json:"file"`
	Manifest string `json:"manifest"`
}

// PlannedService is what a deploy does to one service.
type PlannedService struct {
	Name          string   `json:"name"`
	Image         string   `json:"image"`
	ImageRef      string   `json:"image_ref,omitempty"` // what every machine runs: NAME@sha256:..., or a local image's id
	Action        string   `json:"action"`              // create, change, unchanged, remove, migrate
	Machine       string   `json:"machine"`
	ServiceIP     string   `json:"service_ip,omitempty"` // empty until allocated
	Generation    uint64   `json:"generation"`           // after the deploy
	CreateVolumes []string `json:"create_volumes,omitempty"`
	Changes       []string `json:"changes,omitempty"`
	PlacementNote string   `json:"placement,omitempty"`
	Standby       string   `json:"standby,omitempty"` // the machine keeping its standby copy
}

// DeployPlan is `deploy preview`.
type DeployPlan struct {
	Namespace string           `json:"namespace"`
	Services  []PlannedService `json:"services"`
	Warnings  []string         `json:"warnings,omitempty"`
}

// Service is one row of `service ls`.
type Service struct {
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	Machine    string `json:"machine"`
	ServiceIP  string `json:"service_ip"`
	Generation uint64 `json:"generation"`
	State      string `json:"state"` // ready, starting, failed
	Ready      bool   `json:"ready"`
	Error      string `json:"error,omitempty"`
	// Process: running, restarting, crash-loop, exited or unhealthy, as
	// the machine last reported (empty: not reported).
	Process  string `json:"process,omitempty"`
	Restarts int    `json:"restarts"`
	LastExit *Exit  `json:"last_exit,omitempty"`
	// Secrets names the secrets it reads (never their values).
	Secrets []string `json:"secrets,omitempty"`
	Standby *Standby `json:"standby,omitempty"`
	// LastFailover, when there was one: from, to, when, the loss window
	// and what the old owner wrote after it (once it came back).
	LastFailover   string    `json:"last_failover,omitempty"`
	LastFailoverAt time.Time `json:"last_failover_at,omitzero"`
}

// SecretRequest sets a secret's value (over the control socket only).
type SecretRequest struct {
	Secret string `json:"secret"` // namespace/name
	Value  []byte `json:"value"`
	// Restart restarts the services using it, so they read the new value.
	Restart bool `json:"restart,omitempty"`
}

// SecretInfo is a secret as listed: never its value.
type SecretInfo struct {
	Secret    string    `json:"secret"`
	Version   uint64    `json:"version"`
	Size      int       `json:"size"`
	UpdatedAt time.Time `json:"updated_at"`
	UsedBy    []string  `json:"used_by,omitempty"`
	Restarted []string  `json:"restarted,omitempty"`
}

// FailoverRequest asks to fail a service over to its standby.
type FailoverRequest struct {
	Service string `json:"service"`
	To      string `json:"to,omitempty"` // the standby's name; empty: the standby
}

// FailoverResult is a failover done: where from and to, and the loss
// window — what the old owner wrote after SnapshotTakenAt may be lost.
type FailoverResult struct {
	Service         string    `json:"service"`
	From            string    `json:"from"`
	To              string    `json:"to"`
	Snapshot        string    `json:"snapshot"`
	SnapshotTakenAt time.Time `json:"snapshot_taken_at"`
	FailedOverAt    time.Time `json:"failed_over_at"`
	LossWindow      Duration  `json:"loss_window"`
	Took            Duration  `json:"took"` // until ready on the standby
}

// Standby is a service's standby as listed.
type Standby struct {
	Machine   string    `json:"machine"`
	Failover  string    `json:"failover"` // manual or auto
	Snapshot  string    `json:"snapshot,omitempty"`
	TakenAt   time.Time `json:"taken_at,omitzero"`
	Lag       Duration  `json:"lag,omitempty"` // age of the newest copy: what a failover now would lose
	LastBytes uint64    `json:"last_bytes,omitempty"`
}

// Exit is how a service's process last ended.
type Exit struct {
	Code   int       `json:"code"`
	At     time.Time `json:"at"`
	Reason string    `json:"reason,omitempty"` // oom-killed, unhealthy
}

// DeployResult is what `deploy` did.
// DeployEvent is one step of a deploy as it runs: today the pulls of the
// machines that will run its services.
type DeployEvent struct {
	Time    time.Time `json:"time"`
	Service string    `json:"service"`
	Machine string    `json:"machine"`
	Kind    string    `json:"kind"` // pull, waiting (to be ready), ready
	Message string    `json:"message,omitempty"`
	Layer   string    `json:"layer,omitempty"`
	Bytes   int64     `json:"bytes,omitempty"`
	Total   int64     `json:"total,omitempty"`
}

// DeployStreamLine is one line of the answer to a deploy.
type DeployStreamLine = StreamLine[DeployEvent, DeployResult]

type DeployResult struct {
	Plan       DeployPlan      `json:"plan"`
	Services   []Service       `json:"services"`
	Migrations []MigrationInfo `json:"migrations,omitempty"` // of services the manifest moved
}

// Volume is one row of `volume ls`.
type Volume struct {
	Namespace      string `json:"namespace"`
	Name           string `json:"name"`
	Owner          string `json:"owner"`
	QuotaBytes     uint64 `json:"quota_bytes"`
	UsedBytes      uint64 `json:"used_bytes,omitempty"` // known on the owner
	Dataset        string `json:"dataset,omitempty"`
	NewestSnapshot string `json:"newest_snapshot,omitempty"`
	// Standby holds a copy of it (its service has a standby), and Lag is
	// the age of that copy.
	Standby string   `json:"standby,omitempty"`
	Lag     Duration `json:"lag,omitempty"`
}

// Duration is a time.Duration that reads and writes as a Go duration
// string ("1.5s") in JSON.
type Duration time.Duration

// MarshalJSON writes "1.5s".
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// UnmarshalJSON reads "1.5s".
func (d *Duration) UnmarshalJSON(b []byte) error {
	v, err := time.ParseDuration(strings.Trim(string(b), `"`))
	*d = Duration(v)
	return err
}

// MigrateRequest asks to move a service ("namespace/name") to a machine.
type MigrateRequest struct {
	Service string `json:"service"`
	To      string `json:"to"`
	// MaxDowntime is the downtime budget: warm rounds go on while the
	// predicted downtime exceeds it, and a move that cannot get within it
	// ends before the source stops. Zero takes DefaultMaxDowntime; a
	// negative budget is none (the move converges as well as it can).
	MaxDowntime Duration `json:"max_downtime,omitempty"`
}

// DefaultMaxDowntime is the downtime budget of a move that names none:
// what a web service's clients ride out with a retry.
const DefaultMaxDowntime = Duration(5 * time.Second)

// NoDowntimeBudget asks a move to converge as well as it can and never
// end for its downtime: a drain must empty its machine.
const NoDowntimeBudget = Duration(-1)

// MigrationIDRequest names a migration, for rollback, purge-source and abort.
type MigrationIDRequest struct {
	ID string `json:"id"`
}

// MigrationVolume is one volume's part of a migration.
type MigrationVolume struct {
	Name       string `json:"name"`
	BytesSent  uint64 `json:"bytes_sent"`            // in every round
	FinalBytes uint64 `json:"final_bytes,omitempty"` // in the final increment, after the source stopped
	TotalBytes uint64 `json:"total_bytes,omitempty"` // referenced size on the source at the start
	Base       string `json:"base,omitempty"`        // snapshot the target held already, if used
	Snapshot   string `json:"snapshot,omitempty"`    // newest snapshot both sides hold
}

// MigrationInfo is one migration as `migrate ls` and `migrate show` show it.
type MigrationInfo struct {
	ID             string            `json:"id"`
	Service        string            `json:"service"`
	Source         string            `json:"source"`
	Target         string            `json:"target"`
	Executor       string            `json:"executor"` // the machine that ran it
	Phase          string            `json:"phase"`
	Volumes        []MigrationVolume `json:"volumes"`
	Downtime       Duration          `json:"downtime,omitempty"` // source stopped to target ready
	Error          string            `json:"error,omitempty"`
	RollbackOf     string            `json:"rollback_of,omitempty"`
	StartedAt      time.Time         `json:"started_at"`
	SourceStopped  time.Time         `json:"source_stopped_at,omitzero"`
	TargetReady    time.Time         `json:"target_ready_at,omitzero"`
	CommittedAt    time.Time         `json:"committed_at,omitzero"`
	EndedAt        time.Time         `json:"ended_at,omitzero"`
	SourcePurgedAt time.Time         `json:"source_purged_at,omitzero"`
	RetainedUntil  time.Time         `json:"retained_until,omitzero"` // source copy kept until (done, not purged)
	Cutover        *Cutover          `json:"cutover,omitempty"`       // the downtime, phase by phase
}

// Cutover breaks a move's downtime down as its executor measured it:
// Prepared happened before the stop; the others are the downtime, in
// order, and Total runs from the stop to the commit applied.
type Cutover struct {
	Prepared      Duration `json:"prepared"`
	Stop          Duration `json:"stop"`
	FinalSnapshot Duration `json:"final_snapshot"`
	FinalSend     Duration `json:"final_send"`
	Adopt         Duration `json:"adopt"`
	Start         Duration `json:"start"`
	Ready         Duration `json:"ready"`
	Commit        Duration `json:"commit"`
	Total         Duration `json:"total"`
	FinalBytes    uint64   `json:"final_bytes"`
	Held          bool     `json:"held,omitempty"` // Start released a container started before the stop
}

// String puts the breakdown on one line.
func (c Cutover) String() string {
	ms := func(d Duration) string { return time.Duration(d).Round(time.Millisecond).String() }
	parts := []string{"stop " + ms(c.Stop), "final snapshot " + ms(c.FinalSnapshot),
		fmt.Sprintf("final send %s (%.1f MiB)", ms(c.FinalSend), float64(c.FinalBytes)/(1<<20))}
	if c.Adopt > 0 {
		parts = append(parts, "adopt "+ms(c.Adopt))
	}
	start := "container start "
	if c.Held {
		start = "release of the held container "
	}
	parts = append(parts, start+ms(c.Start), "ready "+ms(c.Ready), "commit "+ms(c.Commit))
	return fmt.Sprintf("%s from the stop to the commit: %s; prepared before the stop in %s", ms(c.Total), strings.Join(parts, ", "), ms(c.Prepared))
}

// MigrationEvent is one step of a running migration, as `migrate apply`
// shows it live.
type MigrationEvent struct {
	Time    time.Time `json:"time"`
	ID      string    `json:"id"`
	Kind    string    `json:"kind"` // "phase" or "progress"
	Phase   string    `json:"phase"`
	Round   int       `json:"round,omitempty"` // warm round, 0 for the final increment
	Volume  string    `json:"volume,omitempty"`
	Bytes   uint64    `json:"bytes,omitempty"`   // sent in this round so far
	Total   uint64    `json:"total,omitempty"`   // expected in this round, when known
	Rate    float64   `json:"rate,omitempty"`    // bytes per second in this round
	Message string    `json:"message,omitempty"` // what happens, in words
}

// StreamLine is one line of the answer to a long request (a migration, a
// drain): events while it runs, then its result or its error.
type StreamLine[E, R any] struct {
	Event  *E         `json:"event,omitempty"`
	Result *R         `json:"result,omitempty"`
	Error  *ErrorBody `json:"error,omitempty"`
}

// MigrateStreamLine is one line of the answer to a migration request.
type MigrateStreamLine = StreamLine[MigrationEvent, MigrationInfo]

// DrainRequest asks to drain a machine ("self" is this machine).
type DrainRequest struct {
	Machine  string   `json:"machine"`
	Deadline Duration `json:"deadline,omitempty"` // 0: none
	Parallel int      `json:"parallel,omitempty"` // 0: 1
	DryRun   bool     `json:"dry_run,omitempty"`
	Wait     bool     `json:"wait,omitempty"`
}

// DrainItem is one service of a drain.
type DrainItem struct {
	Service   string `json:"service"`
	Target    string `json:"target,omitempty"`
	State     string `json:"state"` // pending, migrating, moved, stays, failed, skipped
	Migration string `json:"migration,omitempty"`
	Reason    string `json:"reason,omitempty"`
}

// DrainInfo is a machine's latest drain, or with DryRun its plan.
type DrainInfo struct {
	Machine   string      `json:"machine"`
	Executor  string      `json:"executor,omitempty"`
	State     string      `json:"state"` // planned (dry run), running, drained, incomplete, cancelled
	Parallel  int         `json:"parallel"`
	Deadline  time.Time   `json:"deadline,omitzero"`
	StartedAt time.Time   `json:"started_at,omitzero"`
	EndedAt   time.Time   `json:"ended_at,omitzero"`
	Note      string      `json:"note,omitempty"`
	Items     []DrainItem `json:"items"`
	Moved     int         `json:"moved"`
	Left      int         `json:"left"` // not moved (yet)
}

// DrainEvent is one step of a running drain: a service's state changed,
// or one of its migration's events (Migration set).
type DrainEvent struct {
	Time      time.Time       `json:"time"`
	Service   string          `json:"service,omitempty"`
	Target    string          `json:"target,omitempty"`
	State     string          `json:"state,omitempty"`
	Message   string          `json:"message,omitempty"`
	Migration *MigrationEvent `json:"migration,omitempty"`
}

// RemoveMachineRequest asks to remove a machine from the cluster.
type RemoveMachineRequest struct {
	Machine string `json:"machine"`
	Force   bool   `json:"force,omitempty"`
}

// RemovedMachine is what `machine rm` did.
type RemovedMachine struct {
	Machine string   `json:"machine"`
	ID      string   `json:"id"`
	Left    bool     `json:"left"` // the machine was alive and was told to leave
	Lost    []string `json:"lost,omitempty"`
}

// RenderedManifest is `migrate render-manifest`: the namespace's manifest
// with the service placed on the target and its volumes marked to move.
type RenderedManifest struct {
	Namespace string `json:"namespace"`
	Text      string `json:"text"`
}

// MigrationCheck is one pre-flight check.
type MigrationCheck struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// MigrationPlanVolume is one volume a migration would move.
type MigrationPlanVolume struct {
	Name            string `json:"name"`
	ReferencedBytes uint64 `json:"referenced_bytes"`
	IncrementalBase string `json:"incremental_base,omitempty"` // a snapshot both sides hold, if any
	BaseGUID        uint64 `json:"base_guid,omitempty"`
}

// MigrationPlan is `migrate preview`.
type MigrationPlan struct {
	Service string                `json:"service"`
	Source  string                `json:"source"`
	Target  string                `json:"target"`
	Volumes []MigrationPlanVolume `json:"volumes"`
	Checks  []MigrationCheck      `json:"checks"`
	Phases  []string              `json:"phases"`
	After   string                `json:"after"`
	// PredictedDowntime is the fixed cost of a cutover (stop, final
	// snapshot, start, readiness, commit), measured by earlier moves
	// (FixedCostFrom says which), before the final increment's own send,
	// which the warm copy measures and keeps within MaxDowntime.
	PredictedDowntime Duration `json:"predicted_downtime"`
	FixedCostFrom     string   `json:"fixed_cost_from"`
	MaxDowntime       Duration `json:"max_downtime"` // negative: none
	OK                bool     `json:"ok"`
}

// ProbeRequest asks the daemon to commit no-op entries through the fact
// store and time each one (`cluster probe`). Zero fields take defaults.
type ProbeRequest struct {
	Proposers int      `json:"proposers,omitempty"` // concurrent proposers (1)
	Count     int      `json:"count,omitempty"`     // entries in all (100)
	Timeout   Duration `json:"timeout,omitempty"`   // for one entry (5s)
}

// ProbeResult is what a probe measured: the latency of one commit, from
// proposal on this machine to applied here, and the rate of the run.
type ProbeResult struct {
	Machine    string   `json:"machine"` // where the entries were proposed
	Leader     string   `json:"leader"`  // the leader when the run ended
	Proposers  int      `json:"proposers"`
	Committed  int      `json:"committed"`
	Failed     int      `json:"failed"`
	FirstError string   `json:"first_error,omitempty"`
	Elapsed    Duration `json:"elapsed"`
	PerSecond  float64  `json:"per_second"` // committed entries per second of the run
	P50        Duration `json:"p50"`
	P90        Duration `json:"p90"`
	P99        Duration `json:"p99"`
	Max        Duration `json:"max"`
}

// ImagePushRequest is `image push`: an image of this machine's engine to
// the named machines, or to all others.
type ImagePushRequest struct {
	Image string   `json:"image"`
	To    []string `json:"to,omitempty"`
	All   bool     `json:"all,omitempty"`
}

// ImagePushed is one machine's outcome of a push.
type ImagePushed struct {
	Machine string   `json:"machine"`
	Bytes   uint64   `json:"bytes"`
	Took    Duration `json:"took"`
	Error   string   `json:"error,omitempty"`
}

// ImagePushResult is `image push`'s outcome.
type ImagePushResult struct {
	Image    string        `json:"image"`
	Machines []ImagePushed `json:"machines"`
}
