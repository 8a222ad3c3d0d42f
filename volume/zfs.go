// Package volume holds drover's volume driver: one ZFS dataset per volume,
// under a parent dataset, as <parent>/<namespace>/<volume>.
package volume

import (
	"errors"
	"fmt"
	"io"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"

	zfs "github.com/mistifyio/go-zfs/v3"
)

// ErrNotFound: the volume has no dataset on this machine.
var ErrNotFound = errors.New("volume not found")

// Snapshot is one snapshot of a volume.
type Snapshot struct {
	Name string `json:"name"` // the part after '@'
	GUID uint64 `json:"guid"`
}

// Info describes a volume's dataset.
type Info struct {
	Namespace       string     `json:"namespace"`
	Name            string     `json:"name"`
	Dataset         string     `json:"dataset"`
	Mountpoint      string     `json:"mountpoint"`
	QuotaBytes      uint64     `json:"quota_bytes"`
	UsedBytes       uint64     `json:"used_bytes"`
	ReferencedBytes uint64     `json:"referenced_bytes"`
	Snapshots       []Snapshot `json:"snapshots"` // oldest first
}

// ZFS is the driver on go-zfs.
type ZFS struct {
	parent string
}

// NewZFS makes the driver, creating the parent dataset if needed.
func NewZFS(parent string) (*ZFS, error) {
	if parent == "" || strings.ContainsAny(parent, "@# ") {
		return nil, fmt.Errorf("bad parent dataset %q", parent)
	}
	if err := ensureFS(parent, nil); err != nil {
		return nil, err
	}
	return &ZFS{parent: parent}, nil
}

func ensureFS(name string, props map[string]string) error {
	if exists(name) {
		return nil
	}
	if i := strings.LastIndex(name, "/"); i > 0 {
		if err := ensureFS(name[:i], nil); err != nil {
			return err
		}
	}
	if _, err := zfs.CreateFilesystem(name, props); err != nil {
		return fmt.Errorf("creating dataset %s: %w", name, err)
	}
	return nil
}

// Dataset is the dataset name of a volume.
func (z *ZFS) Dataset(namespace, name string) string {
	return z.parent + "/" + namespace + "/" + name
}

// Properties are the ZFS properties drover sets on a volume's dataset.
// Zero values keep drover's defaults: ZFS's recordsize (128 KiB), and
// compression on (the pool's default algorithm: lz4 on OpenZFS, lzjb on
// zfs-fuse), which costs little and saves space.
type Properties struct {
	Quota       uint64
	RecordSize  uint64
	Compression string
}

// DefaultCompression is the compression of a volume that names none.
const DefaultCompression = "on"

// Ensure creates the volume's dataset if it is missing and sets its
// properties where they differ.
func (z *ZFS) Ensure(namespace, name string, p Properties) (Info, error) {
	ds := z.Dataset(namespace, name)
	if err := ensureFS(ds, nil); err != nil {
		return Info{}, err
	}
	// A standby copy this machine now owns (a failover), or a copy left
	// unmounted: serve it.
	if err := activate(ds); err != nil {
		return Info{}, err
	}
	if err := z.SetProperties(namespace, name, p); err != nil {
		return Info{}, err
	}
	return z.Get(namespace, name)
}

// SetProperties sets a volume's quota, recordsize and compression where
// they differ from what its dataset has. A new recordsize or compression
// applies to the blocks written from then on.
func (z *ZFS) SetProperties(namespace, name string, p Properties) error {
	ds := z.Dataset(namespace, name)
	out, err := exec.Command("zfs", "get", "-Hp", "-o", "value", "quota,recordsize,compression", ds).Output()
	if err != nil {
		return fmt.Errorf("reading the properties of %s: %w", ds, err)
	}
	have := strings.Fields(string(out))
	if len(have) != 3 {
		return fmt.Errorf("reading the properties of %s: %q", ds, out)
	}
	want := map[string]string{"compression": DefaultCompression}
	if p.Quota > 0 {
		want["quota"] = strconv.FormatUint(p.Quota, 10)
	}
	if p.RecordSize > 0 {
		want["recordsize"] = strconv.FormatUint(p.RecordSize, 10)
	}
	if p.Compression != "" {
		want["compression"] = p.Compression
	}
	for i, prop := range []string{"quota", "recordsize", "compression"} {
		v, ok := want[prop]
		if !ok || have[i] == v {
			continue
		}
		if out, err := exec.Command("zfs", "set", prop+"="+v, ds).CombinedOutput(); err != nil {
			return fmt.Errorf("setting %s=%s on %s: %w: %s", prop, v, ds, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// Get describes one volume; ErrNotFound when it has no dataset here.
//
// One `zfs get` reads the dataset and its snapshots. (go-zfs lists them
// with a command per snapshot for the guid, and on the lab's zfs-fuse a
// listing through its shim costs a command per dataset more: with the
// reconciler, the standby and the janitor reading volumes every second,
// an idle three-host lab kept its two cores busy.)
func (z *ZFS) Get(namespace, name string) (Info, error) {
	ds := z.Dataset(namespace, name)
	for try := 0; ; try++ {
		out, err := exec.Command("zfs", "get", "-Hp", "-r", "-d", "1", "-o", "name,property,value",
			"guid,createtxg,mountpoint,quota,used,referenced", ds).CombinedOutput()
		switch {
		case err == nil:
			return parseInfo(namespace, name, ds, string(out))
		case strings.Contains(string(out), "'"+ds+"': dataset does not exist"):
			return Info{}, fmt.Errorf("%s: %w", ds, ErrNotFound)
		case try < 3 && strings.Contains(string(out), "does not exist"):
			// A snapshot destroyed while the command ran (a prune, a
			// settle, a migration's cleanup): read again.
			continue
		}
		return Info{}, fmt.Errorf("reading %s: %w: %s", ds, err, strings.TrimSpace(string(out)))
	}
}

// parseInfo reads the output of `zfs get -Hp -r -d 1 -o
// name,property,value` for dataset ds: its mountpoint and sizes, and its
// snapshots oldest first (by createtxg). Anything else listed (a child
// dataset) is left out.
func parseInfo(namespace, name, ds, out string) (Info, error) {
	info := Info{Namespace: namespace, Name: name, Dataset: ds}
	type snap struct {
		Snapshot
		txg uint64
	}
	snaps := map[string]*snap{}
	num := func(line, v string) (uint64, error) {
		if v == "-" || v == "none" {
			return 0, nil
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("reading %s: line %q: %w", ds, line, err)
		}
		return n, nil
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 3 {
			return Info{}, fmt.Errorf("reading %s: unexpected line %q", ds, line)
		}
		dsName, prop, value := f[0], f[1], f[2]
		if dsName == ds {
			var err error
			switch prop {
			case "mountpoint":
				info.Mountpoint = value
			case "quota":
				info.QuotaBytes, err = num(line, value)
			case "used":
				info.UsedBytes, err = num(line, value)
			case "referenced":
				info.ReferencedBytes, err = num(line, value)
			}
			if err != nil {
				return Info{}, err
			}
			continue
		}
		snapName, ok := strings.CutPrefix(dsName, ds+"@")
		if !ok {
			continue
		}
		sn := snaps[snapName]
		if sn == nil {
			sn = &snap{Snapshot: Snapshot{Name: snapName}}
			snaps[snapName] = sn
		}
		var err error
		switch prop {
		case "guid":
			sn.GUID, err = num(line, value)
		case "createtxg":
			sn.txg, err = num(line, value)
		}
		if err != nil {
			return Info{}, err
		}
	}
	ordered := make([]*snap, 0, len(snaps))
	for _, sn := range snaps {
		if sn.GUID == 0 {
			return Info{}, fmt.Errorf("reading %s: no guid for snapshot %s", ds, sn.Name)
		}
		ordered = append(ordered, sn)
	}
	sort.Slice(ordered, func(i, j int) bool { return ordered[i].txg < ordered[j].txg })
	for _, sn := range ordered {
		info.Snapshots = append(info.Snapshots, sn.Snapshot)
	}
	return info, nil
}

// guidOf reads a dataset's guid exactly (go-zfs reads properties without
// -p, which some zfs builds abbreviate).
func guidOf(name string) (uint64, error) {
	out, err := exec.Command("zfs", "get", "-Hp", "-o", "value", "guid", name).Output()
	if err != nil {
		return 0, fmt.Errorf("reading guid of %s: %w", name, err)
	}
	g, err := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("guid of %s: %w", name, err)
	}
	return g, nil
}

// List describes every volume under the parent.
func (z *ZFS) List() ([]Info, error) {
	out, err := exec.Command("zfs", "list", "-H", "-o", "name", "-t", "filesystem", "-d", "2", z.parent).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w: %s", z.parent, err, strings.TrimSpace(string(out)))
	}
	var infos []Info
	for _, ds := range strings.Fields(string(out)) {
		rel, ok := strings.CutPrefix(ds, z.parent+"/")
		ns, name, isVolume := strings.Cut(rel, "/")
		if !ok || !isVolume || strings.Contains(name, "/") {
			continue // the parent, or a namespace
		}
		info, err := z.Get(ns, name)
		if errors.Is(err, ErrNotFound) {
			continue // destroyed since the listing
		}
		if err != nil {
			return nil, err
		}
		infos = append(infos, info)
	}
	return infos, nil
}

// Snapshot takes a snapshot of the volume.
func (z *ZFS) Snapshot(namespace, name, snap string) (Snapshot, error) {
	// Two commands, not a listing of every property before and after: a
	// migration's final snapshot is taken while the service is down.
	ds := z.Dataset(namespace, name)
	if out, err := exec.Command("zfs", "snapshot", ds+"@"+snap).CombinedOutput(); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s@%s: %w: %s", ds, snap, err, strings.TrimSpace(string(out)))
	}
	guid, err := guidOf(ds + "@" + snap)
	if err != nil {
		return Snapshot{}, err
	}
	return Snapshot{Name: snap, GUID: guid}, nil
}

// Send writes a replication stream of snapshot snap: full when base is
// empty, else incremental from snapshot base.
func (z *ZFS) Send(namespace, name, snap, base string, w io.Writer) error {
	ds := z.Dataset(namespace, name)
	args := []string{"send"}
	what := ds + "@" + snap
	if base != "" {
		args = append(args, "-i", ds+"@"+base)
		what += " from " + base
	}
	cmd := exec.Command("zfs", append(args, ds+"@"+snap)...)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = w, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("sending %s: %w: %s", what, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// Receive reads a stream into dataset (a full stream creates it, an
// incremental one applies to it).
func (z *ZFS) Receive(dataset string, r io.Reader) error {
	if i := strings.LastIndex(dataset, "/"); i > 0 {
		if err := ensureFS(dataset[:i], nil); err != nil {
			return err
		}
	}
	if _, err := zfs.ReceiveSnapshot(r, dataset); err != nil {
		return fmt.Errorf("receiving into %s: %w", dataset, err)
	}
	return nil
}

// Destroy removes the volume's dataset and its snapshots.
func (z *ZFS) Destroy(namespace, name string) error {
	ds := z.Dataset(namespace, name)
	d, err := zfs.GetDataset(ds)
	if err != nil {
		return fmt.Errorf("%s: %w", ds, ErrNotFound)
	}
	return destroy(d)
}

// destroy removes a dataset and its snapshots. A dataset whose last writer
// just closed can be "busy" for a moment (zfs-fuse more than OpenZFS); a
// few short retries ride that out. go-zfs reports only the command's
// text, hence the match on it.
func destroy(d *zfs.Dataset) error {
	for try := 0; ; try++ {
		err := d.Destroy(zfs.DestroyRecursive)
		if err == nil {
			return nil
		}
		if try == 20 || !strings.Contains(err.Error(), "busy") {
			return fmt.Errorf("destroying %s: %w", d.Name, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// rename renames a dataset, riding out the moment a dataset that was
// just received or unmounted is "busy" (as destroy does).
func rename(d *zfs.Dataset, to string) (*zfs.Dataset, error) {
	for try := 0; ; try++ {
		moved, err := d.Rename(to, false, false)
		if err == nil {
			return moved, nil
		}
		if try == 20 || !strings.Contains(err.Error(), "busy") {
			return nil, fmt.Errorf("renaming %s to %s: %w", d.Name, to, err)
		}
		d.Unmount(true)
		time.Sleep(250 * time.Millisecond)
	}
}

// FreeBytes is the space left for volumes under the parent.
func (z *ZFS) FreeBytes() (uint64, error) {
	out, err := exec.Command("zfs", "get", "-Hp", "-o", "value", "available", z.parent).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w: %s", z.parent, err, strings.TrimSpace(string(out)))
	}
	free, err := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("reading the space available in %s: %w", z.parent, err)
	}
	return free, nil
}

// StagingDataset is where an incoming copy of a volume lands during a
// migration, outside the volumes' tree so it is never taken for a volume.
func (z *ZFS) StagingDataset(migrationID, volume string) string {
	return z.parent + "-incoming/" + migrationID + "-" + volume
}

// SnapshotGUID reads the GUID of dataset@snap.
func (z *ZFS) SnapshotGUID(dataset, snap string) (uint64, error) {
	return guidOf(dataset + "@" + snap)
}

// ErrExists: the target dataset of an adoption exists already.
var ErrExists = errors.New("dataset exists")

// Adopt renames a received staging dataset into the volume's place. It
// never overwrites: an existing volume dataset is an error.
func (z *ZFS) Adopt(staging, namespace, name string) (Info, error) {
	final := z.Dataset(namespace, name)
	if _, err := zfs.GetDataset(final); err == nil {
		return Info{}, fmt.Errorf("adopting %s as %s: %w", staging, final, ErrExists)
	}
	if err := ensureFS(z.parent+"/"+namespace, nil); err != nil {
		return Info{}, err
	}
	d, err := zfs.GetDataset(staging)
	if err != nil {
		return Info{}, fmt.Errorf("reading %s: %w", staging, err)
	}
	if err := unmark(staging); err != nil {
		return Info{}, err
	}
	// Nothing uses the staging copy: unmount it so the rename is not
	// refused as busy, then mount it where the volume belongs.
	if _, err := d.Unmount(true); err != nil {
		return Info{}, fmt.Errorf("unmounting %s: %w", staging, err)
	}
	moved, err := rename(d, final)
	if err != nil {
		return Info{}, err
	}
	if _, err := moved.Mount(false, nil); err != nil && !strings.Contains(err.Error(), "already mounted") {
		return Info{}, fmt.Errorf("mounting %s: %w", final, err)
	}
	return z.Get(namespace, name)
}

// DestroyDataset removes a dataset by name with its snapshots; a missing
// one is not an error (cleanup may run twice).
func (z *ZFS) DestroyDataset(name string) error {
	if !strings.HasPrefix(name, z.parent) {
		return fmt.Errorf("refusing to destroy %s: not under %s", name, z.parent)
	}
	d, err := zfs.GetDataset(name)
	if err != nil {
		return nil
	}
	return destroy(d)
}
