package volume

import (
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// standbyProperty names, on a volume's dataset, the service whose
// standby copy it is: a copy that another machine owns the volume of,
// kept unmounted (canmount=noauto) and refreshed by incremental receives.
const standbyProperty = "drover:standby"

// StandbySnapshotPrefix starts the snapshots a standby copy is refreshed
// with.
const StandbySnapshotPrefix = SnapshotPrefix + "standby-"

func zfsRun(args ...string) (string, error) {
	out, err := exec.Command("zfs", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("zfs %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

func zfsGet(prop, dataset string) string {
	out, err := exec.Command("zfs", "get", "-H", "-o", "value", prop, dataset).Output()
	if err != nil {
		return ""
	}
	v := strings.TrimSpace(string(out))
	if v == "-" {
		return ""
	}
	return v
}

// StandbyOf names the service whose standby copy the volume's dataset is;
// empty when it is none.
func (z *ZFS) StandbyOf(namespace, name string) string {
	return zfsGet(standbyProperty, z.Dataset(namespace, name))
}

// ReceiveStandby refreshes the standby copy of a volume for service (its
// key) from a stream. A full stream lands in a staging dataset, is
// unmounted, marked and renamed into place (zfs-fuse has no receive -u:
// the staging copy is mounted for that moment, where nothing uses it);
// an incremental one is received into the unmounted copy, which stays
// unmounted. A dataset that is neither this service's standby copy nor a
// copy kept from a migration is never received into.
func (z *ZFS) ReceiveStandby(namespace, name, service string, incremental bool, r io.Reader) error {
	ds := z.Dataset(namespace, name)
	if !incremental {
		if z.Exists(ds) {
			return fmt.Errorf("a full copy of %s asked, and %s exists: %w", service, ds, ErrExists)
		}
		staging := z.StagingPrefix() + "/standby-" + namespace + "-" + name
		if err := z.DestroyDataset(staging); err != nil {
			return err
		}
		if err := z.Receive(staging, r); err != nil {
			return err
		}
		if err := z.setAside(staging, service); err != nil {
			return err
		}
		if i := strings.LastIndex(ds, "/"); i > 0 {
			if err := ensureFS(ds[:i], nil); err != nil {
				return err
			}
		}
		_, err := zfsRun("rename", staging, ds)
		return err
	}
	if !z.Exists(ds) {
		return fmt.Errorf("an increment of %s asked, and %s has no copy: %w", service, ds, ErrNotFound)
	}
	// Whether this machine may receive into the copy (it does not own the
	// volume, and holds no diverged copy there) is the caller's to know.
	if zfsGet("mounted", ds) == "yes" {
		if err := z.setAside(ds, service); err != nil {
			return err
		}
	}
	if err := z.ReceiveInto(ds, true, r); err != nil {
		return err
	}
	return z.setAside(ds, service)
}

// setAside makes a dataset a standby copy: never mounted by itself,
// unmounted now, marked with its service.
func (z *ZFS) setAside(ds, service string) error {
	if _, err := zfsRun("set", "canmount=noauto", ds); err != nil {
		return err
	}
	if service != "" {
		if _, err := zfsRun("set", standbyProperty+"="+service, ds); err != nil {
			return err
		}
	}
	if zfsGet("mounted", ds) == "yes" {
		for try := 0; ; try++ {
			_, err := zfsRun("unmount", ds)
			if err == nil {
				break
			}
			if try == 20 || !strings.Contains(err.Error(), "busy") {
				return err
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	return nil
}

// unmark makes a standby copy an ordinary dataset (mounted by itself, no
// longer marked) without mounting it: a migration that takes the copy as
// its base, or a failover, serves from it.
func unmark(ds string) error {
	if zfsGet(standbyProperty, ds) != "" {
		if _, err := zfsRun("inherit", standbyProperty, ds); err != nil {
			return err
		}
	}
	if v := zfsGet("canmount", ds); v != "" && v != "on" {
		if _, err := zfsRun("set", "canmount=on", ds); err != nil {
			return err
		}
	}
	return nil
}

// activate makes a volume's dataset one this machine serves: mounted by
// itself and now, no longer a standby copy.
func activate(ds string) error {
	out, err := exec.Command("zfs", "get", "-H", "-o", "value", standbyProperty+",canmount,mounted", ds).Output()
	have := strings.Fields(string(out))
	if err != nil || len(have) != 3 {
		return fmt.Errorf("reading %s: %v %q", ds, err, out)
	}
	if have[0] == "-" && have[1] == "on" && have[2] == "yes" {
		return nil // the usual case: one command
	}
	if have[0] != "-" {
		if _, err := zfsRun("inherit", standbyProperty, ds); err != nil {
			return err
		}
	}
	if zfsGet("canmount", ds) != "on" {
		if _, err := zfsRun("set", "canmount=on", ds); err != nil {
			return err
		}
	}
	if zfsGet("mounted", ds) != "yes" {
		if _, err := zfsRun("mount", ds); err != nil && !strings.Contains(err.Error(), "already mounted") {
			return err
		}
	}
	return nil
}

// PruneStandbySnapshots destroys the oldest standby snapshots of a
// volume's dataset beyond keep. One a clone depends on (a diverged copy
// set aside) is left.
func (z *ZFS) PruneStandbySnapshots(namespace, name string, keep int) error {
	info, err := z.Get(namespace, name)
	if err != nil {
		return err
	}
	var standby []string
	for _, s := range info.Snapshots {
		if strings.HasPrefix(s.Name, StandbySnapshotPrefix) {
			standby = append(standby, s.Name)
		}
	}
	for i := 0; i < len(standby)-keep; i++ {
		if _, err := zfsRun("destroy", info.Dataset+"@"+standby[i]); err != nil && !strings.Contains(err.Error(), "dependent clones") {
			return err
		}
	}
	return nil
}

// DivergedPrefix is the dataset under which an old owner keeps the copy
// it wrote to after a failover took its service away.
func (z *ZFS) DivergedPrefix() string { return z.parent + "-diverged" }

// SetAsideDiverged keeps the volume's dataset of an old owner aside,
// after a failover: it counts what was written after snapshot base (the
// size of the increment from it; all that is referenced when base is
// gone), renames the dataset under DivergedPrefix, and, when base is
// there, puts a standby copy at base in the volume's place (a clone of
// it, promoted) for service, so the new owner refreshes it with an
// increment. It returns the kept dataset and the bytes.
func (z *ZFS) SetAsideDiverged(namespace, name, base, service string, now time.Time) (string, uint64, error) {
	ds := z.Dataset(namespace, name)
	stamp := strconv.FormatInt(now.Unix(), 10)
	snap := SnapshotPrefix + "diverged-" + stamp
	if _, err := zfsRun("snapshot", ds+"@"+snap); err != nil {
		return "", 0, err
	}
	hasBase := base != "" && z.Exists(ds+"@"+base)
	var written uint64
	if hasBase {
		cmd := exec.Command("zfs", "send", "-i", ds+"@"+base, ds+"@"+snap)
		counter := &byteCounter{}
		var stderr strings.Builder
		cmd.Stdout, cmd.Stderr = counter, &stderr
		if err := cmd.Run(); err != nil {
			return "", 0, fmt.Errorf("measuring what %s wrote after %s: %w: %s", ds, base, err, strings.TrimSpace(stderr.String()))
		}
		written = counter.n
	} else if out, err := exec.Command("zfs", "get", "-Hp", "-o", "value", "referenced", ds).Output(); err == nil {
		written, _ = strconv.ParseUint(strings.TrimSpace(string(out)), 10, 64)
	}
	kept := z.DivergedPrefix() + "/" + namespace + "/" + name + "-" + stamp
	if err := ensureFS(z.DivergedPrefix()+"/"+namespace, nil); err != nil {
		return "", 0, err
	}
	if err := z.setAside(ds, ""); err != nil {
		return "", 0, err
	}
	if _, err := zfsRun("rename", ds, kept); err != nil {
		return "", 0, err
	}
	if !hasBase {
		return kept, written, nil
	}
	if _, err := zfsRun("clone", kept+"@"+base, ds); err != nil {
		return kept, written, err
	}
	if _, err := zfsRun("promote", ds); err != nil {
		return kept, written, err
	}
	return kept, written, z.setAside(ds, service)
}

type byteCounter struct{ n uint64 }

func (c *byteCounter) Write(p []byte) (int, error) { c.n += uint64(len(p)); return len(p), nil }
