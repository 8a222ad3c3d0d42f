package volume

import (
	"fmt"
	"io"
	"os/exec"
	"strings"

	zfs "github.com/mistifyio/go-zfs/v3"
)

// originProperty is the ZFS user property naming the migration whose copy
// a dataset is: set when a target adopts a received copy, so that an
// aborted migration destroys exactly what it put in place and never a
// copy it did not make.
const originProperty = "drover:migration"

// SnapshotPrefix starts the name of every snapshot drover takes.
const SnapshotPrefix = "drover-"

// Exists tells whether a dataset exists.
func (z *ZFS) Exists(name string) bool { return exists(name) }

// exists tells whether a dataset or snapshot exists, in one command
// (go-zfs's GetDataset reads every property).
func exists(name string) bool {
	return exec.Command("zfs", "list", "-H", "-o", "name", name).Run() == nil
}

// StagingPrefix is the dataset under which incoming copies land.
func (z *ZFS) StagingPrefix() string { return z.parent + "-incoming" }

// Staging lists the incoming copies on this machine by dataset name, in
// one command (the janitor asks every interval).
func (z *ZFS) Staging() ([]string, error) {
	prefix := z.StagingPrefix()
	out, err := exec.Command("zfs", "list", "-H", "-o", "name", "-t", "filesystem", "-d", "1", prefix).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "'"+prefix+"': dataset does not exist") {
			return nil, nil // none received yet
		}
		return nil, fmt.Errorf("listing %s: %w: %s", prefix, err, strings.TrimSpace(string(out)))
	}
	var copies []string
	for _, name := range strings.Fields(string(out)) {
		if strings.HasPrefix(name, prefix+"/") {
			copies = append(copies, name)
		}
	}
	return copies, nil
}

// ReceiveInto reads a stream into dataset. An incremental stream is
// applied with -F: a copy that nobody writes may still have changed since
// its last snapshot (atime, a mount), and those changes are not data.
func (z *ZFS) ReceiveInto(dataset string, incremental bool, r io.Reader) error {
	if !incremental {
		return z.Receive(dataset, r)
	}
	cmd := exec.Command("zfs", "receive", "-F", dataset)
	cmd.Stdin = r
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("receiving into %s: %w: %s", dataset, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// MoveDataset renames a dataset (unmounted first so the rename is not
// refused as busy) and mounts it again; used to turn a retained copy into
// a staging copy and back.
func (z *ZFS) MoveDataset(from, to string) error {
	for _, name := range []string{from, to} {
		if !strings.HasPrefix(name, z.parent) {
			return fmt.Errorf("refusing to move %s to %s: not under %s", from, to, z.parent)
		}
	}
	if i := strings.LastIndex(to, "/"); i > 0 {
		if err := ensureFS(to[:i], nil); err != nil {
			return err
		}
	}
	d, err := zfs.GetDataset(from)
	if err != nil {
		return fmt.Errorf("reading %s: %w", from, err)
	}
	// A standby copy taken as a migration's base becomes an ordinary
	// copy: an increment received into it while mounted keeps it so.
	if err := unmark(from); err != nil {
		return err
	}
	if _, err := d.Unmount(true); err != nil && !strings.Contains(err.Error(), "not currently mounted") {
		return fmt.Errorf("unmounting %s: %w", from, err)
	}
	moved, err := rename(d, to)
	if err != nil {
		return err
	}
	if _, err := moved.Mount(false, nil); err != nil && !strings.Contains(err.Error(), "already mounted") {
		return fmt.Errorf("mounting %s: %w", to, err)
	}
	return nil
}

// SetOrigin records on a volume's dataset the migration that put it here.
func (z *ZFS) SetOrigin(namespace, name, migrationID string) error {
	d, err := zfs.GetDataset(z.Dataset(namespace, name))
	if err != nil {
		return fmt.Errorf("reading %s: %w", z.Dataset(namespace, name), err)
	}
	if err := d.SetProperty(originProperty, migrationID); err != nil {
		return fmt.Errorf("marking %s as the copy of migration %s: %w", d.Name, migrationID, err)
	}
	return nil
}

// Origin is the migration that put a volume's dataset here; empty when a
// deploy created it or there is none.
func (z *ZFS) Origin(namespace, name string) string {
	out, err := exec.Command("zfs", "get", "-H", "-o", "value", originProperty, z.Dataset(namespace, name)).Output()
	if err != nil {
		return ""
	}
	v := strings.TrimSpace(string(out))
	if v == "-" {
		return ""
	}
	return v
}

// DestroySnapshotsOf destroys the volume's snapshots whose names start
// with prefix (a migration's rounds and final snapshot, when an abort
// throws them away): they would otherwise hold the blocks they share
// with nothing until a later move succeeds.
func (z *ZFS) DestroySnapshotsOf(namespace, name, prefix string) error {
	if !strings.HasPrefix(prefix, SnapshotPrefix) || prefix == SnapshotPrefix {
		return fmt.Errorf("refusing to destroy the snapshots of %s/%s named %q*: not one migration's", namespace, name, prefix)
	}
	return z.destroySnapshots(namespace, name, func(snap string) bool { return strings.HasPrefix(snap, prefix) })
}

// RollbackTo rolls a dataset back to one of its snapshots, destroying
// the snapshots taken after it: an incremental stream from snap is then
// received whatever landed there since (zfs-fuse receives one only onto
// the dataset's newest snapshot).
func (z *ZFS) RollbackTo(dataset, snap string) error {
	if !strings.HasPrefix(dataset, z.parent) {
		return fmt.Errorf("refusing to roll back %s: not under %s", dataset, z.parent)
	}
	if out, err := exec.Command("zfs", "rollback", "-r", dataset+"@"+snap).CombinedOutput(); err != nil {
		return fmt.Errorf("rolling %s back to %s: %w: %s", dataset, snap, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// PruneSnapshots destroys the volume's drover snapshots except keep.
func (z *ZFS) PruneSnapshots(namespace, name, keep string) error {
	return z.destroySnapshots(namespace, name, func(snap string) bool {
		return snap != keep && strings.HasPrefix(snap, SnapshotPrefix)
	})
}

// destroySnapshots destroys the volume's snapshots whose short names
// (after the @) drop tells.
func (z *ZFS) destroySnapshots(namespace, name string, drop func(snap string) bool) error {
	d, err := zfs.GetDataset(z.Dataset(namespace, name))
	if err != nil {
		return fmt.Errorf("reading %s: %w", z.Dataset(namespace, name), err)
	}
	snaps, err := d.Snapshots()
	if err != nil {
		return fmt.Errorf("listing snapshots of %s: %w", d.Name, err)
	}
	for _, s := range snaps {
		if !drop(s.Name[strings.Index(s.Name, "@")+1:]) {
			continue
		}
		if err := s.Destroy(zfs.DestroyDefault); err != nil {
			return fmt.Errorf("destroying %s: %w", s.Name, err)
		}
	}
	return nil
}
