package migrate

import (
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/volume"
)

// Daemon-to-daemon calls of a migration. The executor (the daemon where
// `migrate apply` ran) drives them; source and target check every call
// against the migration's facts. The paths carry the wire's version (see
// DESIGN.md, "Upgrading").
var (
	// source: snapshot and stream a volume to the target
	routeSend = peer.Stream[sendRequest, sendProgress, sendResult]{Path: "migrate/v2/send"}
	// target: receive a stream from the source
	routeReceive = peer.Upload[streamRequest, receiveResult]{Path: "migrate/v2/receive"}
	// source: stop the service's container (kept)
	routeStopSource   = peer.Route[migrationRef, stopResult]{Path: "migrate/v2/stop-source"}
	routePrepareImage = peer.Stream[migrationRef, runtime.PullProgress, prepareResult]{Path: "migrate/v2/prepare-image"}
	routeSendImage    = peer.Stream[migrationRef, imageProgress, imageSent]{Path: "migrate/v2/send-image"}
	routeLoadImage    = peer.Upload[migrationRef, done]{Path: "migrate/v2/load-image"}
	// target, after the warm copy: copies in place, container created
	routePrepareTarget = peer.Route[migrationRef, preparedTarget]{Path: "migrate/v2/prepare-target"}
	// source: stop, then send the final increment of every volume
	routeCutover = peer.Stream[cutoverRequest, cutoverProgress, cutoverResult]{Path: "migrate/v2/cutover"}
	// source: run the service's flush command before the last warm round
	routeFlush = peer.Route[migrationRef, flushResult]{Path: "migrate/v2/flush"}
	// target: start (adopting the copies first if not prepared), wait ready
	routeStartTarget = peer.Route[migrationRef, startResult]{Path: "migrate/v2/start-target"}
	// both: undo before the commit
	routeAbort = peer.Route[migrationRef, done]{Path: "migrate/v2/abort"}
	// source, after the commit: container away, copy kept
	routeCleanupSource = peer.Route[migrationRef, done]{Path: "migrate/v2/cleanup-source"}
	// target, after the commit: keep only the final snapshot
	routeCleanupTarget = peer.Route[migrationRef, done]{Path: "migrate/v2/cleanup-target"}
	// source of a done migration: destroy the kept copy
	routePurgeSource = peer.Route[migrationRef, done]{Path: "migrate/v2/purge-source"}
	// any machine: what only it knows (pre-flight, drain planning)
	routeLocalFacts = peer.Route[LocalQuery, LocalFacts]{Path: "machine/v2/local"}
)

// migrationRef names the migration a call is about.
type migrationRef struct {
	ID string `json:"id"`
}

// done is the answer of a call that returns nothing but success.
type done struct{}

// streamRequest names one snapshot of one volume to move, incremental
// from base when base is not empty.
type streamRequest struct {
	ID     string `json:"id"`
	Volume string `json:"volume"`
	Snap   string `json:"snap"`
	Base   string `json:"base,omitempty"`
}

// sendRequest asks the source to stream a snapshot to the target.
type sendRequest = streamRequest

// sendProgress is the source's line every half second while it sends.
type sendProgress struct {
	Bytes uint64 `json:"bytes"`
}

// sendResult is the outcome of a send: bytes moved and the snapshot's
// GUID on both sides.
type sendResult struct {
	Bytes      uint64 `json:"bytes"`
	SourceGUID uint64 `json:"source_guid"`
	TargetGUID uint64 `json:"target_guid"`
}

// receiveResult is the target's answer to a stream.
type receiveResult struct {
	TargetGUID uint64 `json:"target_guid"`
}

// startResult is the target's answer to start-target.
// stopResult is the source's answer to a stop: whether the container had
// to be killed at the end of its grace period (its stop signal did not
// end it in time). Older daemons answer {} (not killed).
type stopResult struct {
	Killed bool          `json:"killed,omitempty"`
	Grace  time.Duration `json:"grace_ns,omitempty"`
}

// startResult is the target's answer to start-target: when it was ready,
// and how long each step took.
type startResult struct {
	ReadyAt time.Time     `json:"ready_at"`
	Adopt   time.Duration `json:"adopt_ns,omitempty"` // copies put in place now (not prepared)
	Start   time.Duration `json:"start_ns,omitempty"` // the container created (if not prepared) and started
	Ready   time.Duration `json:"ready_ns,omitempty"` // until its readiness check passed
	// Released: the container was held and released, not started.
	Released bool `json:"released,omitempty"`
}

// flushResult is the source's answer to flush: the command's exit code
// and how long it ran.
type flushResult struct {
	ExitCode int           `json:"exit_code"`
	Took     time.Duration `json:"took_ns"`
}

// preparedTarget is the target's answer to prepare-target.
type preparedTarget struct {
	Adopt  time.Duration `json:"adopt_ns"`
	Create time.Duration `json:"create_ns"`
	Held   bool          `json:"held,omitempty"` // started under drover-hold
}

// cutoverRequest asks the source to stop and send the final snapshot of
// each volume, incremental from the base named.
type cutoverRequest struct {
	ID      string          `json:"id"`
	Volumes []streamRequest `json:"volumes"`
}

// cutoverProgress is the source's line during a cutover: once when the
// container stopped, then every half second while it sends.
type cutoverProgress struct {
	Stopped bool   `json:"stopped,omitempty"`
	Volume  string `json:"volume,omitempty"`
	Bytes   uint64 `json:"bytes,omitempty"`
}

// cutoverResult is the outcome of a cutover on the source.
type cutoverResult struct {
	Stop    stopResult       `json:"stop"`
	Stopped time.Duration    `json:"stopped_ns"` // the stop took
	Sends   time.Duration    `json:"sends_ns"`   // the volumes' snapshots and sends, side by side, took
	Volumes []finalIncrement `json:"volumes"`
}

// finalIncrement is one volume's final send.
type finalIncrement struct {
	Volume   string        `json:"volume"`
	Sent     sendResult    `json:"sent"`
	Snapshot time.Duration `json:"snapshot_ns"`
	Send     time.Duration `json:"send_ns"`
}

// LocalQuery asks a machine what only it knows.
type LocalQuery struct {
	Namespace string   `json:"namespace,omitempty"`
	Volumes   []string `json:"volumes,omitempty"` // of Namespace
	Images    []string `json:"images,omitempty"`
}

// LocalFacts is what a machine reports of itself.
type LocalFacts struct {
	VolumeFreeBytes uint64                 `json:"volume_free_bytes"`
	MemoryBytes     uint64                 `json:"memory_bytes"`
	MilliCPUs       uint64                 `json:"milli_cpus,omitempty"` // its cores, in thousandths
	HoldsVolumes    bool                   `json:"holds_volumes"`
	Images          map[string]bool        `json:"images,omitempty"` // of the asked images, which it has
	Volumes         map[string]volume.Info `json:"volumes"`          // those of the asked names it has
	// ImageFrom says, of each asked image it lacks, where it would get
	// it: "registry HOST" (it can pull it), or why it cannot.
	ImageFrom map[string]string `json:"image_from,omitempty"`
}

// CanRun tells whether the machine has the image or can pull it.
func (lf LocalFacts) CanRun(image string) bool {
	return lf.Images[image] || strings.HasPrefix(lf.ImageFrom[image], "registry ")
}

// HowImage says how the machine would get the image, for pre-flight.
func (lf LocalFacts) HowImage(image string) string {
	if lf.Images[image] {
		return "present"
	}
	if from := lf.ImageFrom[image]; from != "" {
		if strings.HasPrefix(from, "registry ") {
			return "pulled from " + from + " during the warm copy"
		}
		return "missing: " + from
	}
	return "missing (docker load it there)"
}

// prepareResult is the target's answer when asked to have the service's
// image before the source stops.
type prepareResult struct {
	Pulled bool          `json:"pulled,omitempty"`
	Took   time.Duration `json:"took_ns,omitempty"`
	// Missing says why the target could not pull it; the source then
	// streams it over the mesh.
	Missing string `json:"missing,omitempty"`
}

// imageProgress and imageSent are the lines and the result of a source
// streaming an image to the target.
type imageProgress struct {
	Bytes uint64 `json:"bytes"`
}

type imageSent struct {
	Bytes uint64 `json:"bytes"`
}

// Errors a migration's calls answer with; their codes cross machines, so
// the executor matches them with errors.Is.
var (
	ErrStalled       = peer.NewError("stream_stalled", "volume stream stalled")
	ErrNoMigration   = peer.NewError("no_migration", "no such migration")
	ErrNotSource     = peer.NewError("not_source", "this machine is not the source")
	ErrNotTarget     = peer.NewError("not_target", "this machine is not the target")
	ErrNotRunning    = peer.NewError("not_running", "the migration does not run before its commit")
	ErrNotCommitted  = peer.NewError("not_committed", "the migration is not committed")
	ErrNotDone       = peer.NewError("not_done", "the migration is not done")
	ErrNoVolumes     = peer.NewError("no_volumes", "this machine holds no volumes (no --zfs-parent)")
	ErrNoCopy        = peer.NewError("no_copy", "this machine has no copy of the volume")
	ErrVolumeOwned   = peer.NewError("volume_owned", "the volume is owned by this machine")
	ErrStreamRefused = peer.NewError("stream_refused", "only the source of a migration may send into its target")
	ErrNoContainer   = peer.NewError("no_container", "the service has no container here")
	ErrGUIDMismatch  = peer.NewError("guid_mismatch", "the snapshot's GUID differs between source and target")
	ErrMachineGone   = peer.NewError("machine_gone", "machine is gone")
	ErrOverBudget    = peer.NewError("over_downtime_budget", "the predicted downtime does not fit the move's budget")
)
