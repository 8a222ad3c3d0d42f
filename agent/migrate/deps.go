package migrate

import (
	"context"
	"encoding/json"
	"io"
	"net/netip"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
	// CaughtUp returns once this machine has the facts the leader had
	// when it was called.
	CaughtUp(ctx context.Context) error
}

// Members is gossip's view of the machines, and this machine's Raft role.
type Members interface {
	Member(id string) (cluster.Member, bool)
	Members() []cluster.Member
	IsLeader() bool
}

// Streams snapshots volumes and moves them as byte streams.
type Streams interface {
	Snapshot(namespace, name, snap string) (volume.Snapshot, error)
	Send(namespace, name, snap, base string, w io.Writer) error
	ReceiveInto(dataset string, incremental bool, r io.Reader) error
	SnapshotGUID(dataset, snap string) (uint64, error)
}

// Datasets names, finds, moves and destroys datasets.
type Datasets interface {
	Dataset(namespace, name string) string
	StagingDataset(migrationID, volume string) string
	Exists(dataset string) bool
	MoveDataset(from, to string) error
	DestroyDataset(dataset string) error
	// RollbackTo rolls a dataset back to its snapshot snap, destroying
	// the snapshots after it.
	RollbackTo(dataset, snap string) error
	// Staging lists the staging datasets of incoming migrations.
	Staging() ([]string, error)
}

// Copies describes a volume's copy on this machine and marks it.
type Copies interface {
	Get(namespace, name string) (volume.Info, error)
	Adopt(staging, namespace, name string) (volume.Info, error)
	SetOrigin(namespace, name, migrationID string) error
	// SetProperties sets the dataset's quota, recordsize and compression.
	SetProperties(namespace, name string, p volume.Properties) error
	Origin(namespace, name string) string
	PruneSnapshots(namespace, name, keep string) error
	// DestroySnapshotsOf destroys the volume's snapshots whose names
	// start with prefix.
	DestroySnapshotsOf(namespace, name, prefix string) error
	FreeBytes() (uint64, error)
}

// Containers finds and stops the containers of this machine.
type Containers interface {
	List(ctx context.Context) ([]runtime.Container, error)
	Stop(ctx context.Context, id string, grace time.Duration) (runtime.Stopped, error)
	// Halt stops a container and returns once its processes are gone;
	// wait returns once the engine's stop is over.
	Halt(ctx context.Context, id string, grace time.Duration) (st runtime.Stopped, wait func() error, err error)
	Restart(ctx context.Context, id string) error
	Remove(ctx context.Context, id string, grace time.Duration) error
	// Exec runs cmd in a running container and gives its exit code.
	Exec(ctx context.Context, id string, cmd []string) (int, error)
}

// Starter creates or starts a service's container and waits until it is
// ready.
type Starter interface {
	Start(ctx context.Context, r runtime.RunSpec) (runtime.Container, error)
	// Create creates the container without starting it.
	Create(ctx context.Context, r runtime.RunSpec) (runtime.Container, error)
	WaitReady(ctx context.Context, c runtime.Container, r runtime.RunSpec) error
	HasImage(ctx context.Context, image string) (bool, error)
}

// Holder starts a container with a placeholder first process and later
// releases it into the service's command (runtime.Docker with
// drover-hold).
type Holder interface {
	CanHold() bool
	CreateHeld(ctx context.Context, r runtime.RunSpec) (runtime.Container, error)
	Release(ctx context.Context, c runtime.Container) error
}

// Images brings a service's image to a machine: from its registry, or
// from another machine's engine over the mesh.
type Images interface {
	// CanPull tells why the image cannot be pulled here, or nil.
	CanPull(ctx context.Context, image string) error
	// EnsureImage pulls the image when the engine lacks it.
	EnsureImage(ctx context.Context, image string, progress func(runtime.PullProgress)) error
	SaveImage(ctx context.Context, image string) (io.ReadCloser, error)
	LoadImage(ctx context.Context, image string, r io.Reader) error
}

// Loopback puts service IPs on this machine's loopback.
type Loopback interface {
	Add(ip netip.Addr) error
	Remove(ip netip.Addr) error
}
