package volume

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A copy kept from an earlier move becomes the staging copy of the next
// one and takes an incremental stream even though its files changed
// since (receive -F); the adopted dataset carries its migration's id;
// pruning keeps only the named drover snapshot.
func TestKeptCopyTakesAnIncrementalAndIsMarked(t *testing.T) {
	withPools(t, "dvmsrc", "dvmdst")
	src, err := NewZFS("dvmsrc/drover")
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewZFS("dvmdst/drover")
	if err != nil {
		t.Fatal(err)
	}
	info, err := src.Ensure("shop", "data", Properties{Quota: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	write := func(dir, name, text string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(info.Mountpoint, "a", "first")
	if _, err := src.Snapshot("shop", "data", "drover-m1-final"); err != nil {
		t.Fatal(err)
	}
	var full bytes.Buffer
	if err := src.Send("shop", "data", "drover-m1-final", "", &full); err != nil {
		t.Fatal(err)
	}
	kept := dst.Dataset("shop", "data")
	if err := dst.Receive(kept, &full); err != nil {
		t.Fatal(err)
	}
	keptInfo, err := dst.Get("shop", "data")
	if err != nil {
		t.Fatal(err)
	}
	write(keptInfo.Mountpoint, "stray", "changed after the snapshot") // a -F receive discards it

	write(info.Mountpoint, "b", "second")
	if _, err := src.Snapshot("shop", "data", "drover-m2-1"); err != nil {
		t.Fatal(err)
	}
	staging := dst.StagingDataset("m2", "data")
	if err := dst.MoveDataset(kept, staging); err != nil {
		t.Fatal(err)
	}
	if dst.Exists(kept) || !dst.Exists(staging) {
		t.Fatal("the kept copy did not move to the staging name")
	}
	if got, err := dst.Staging(); err != nil || len(got) != 1 || got[0] != staging {
		t.Fatalf("staging list %v %v", got, err)
	}
	var incr bytes.Buffer
	if err := src.Send("shop", "data", "drover-m2-1", "drover-m1-final", &incr); err != nil {
		t.Fatal(err)
	}
	if err := dst.ReceiveInto(staging, true, &incr); err != nil {
		t.Fatalf("incremental into a copy changed since its snapshot: %v", err)
	}
	adopted, err := dst.Adopt(staging, "shop", "data")
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(adopted.Mountpoint, "b")); err != nil || string(b) != "second" {
		t.Fatalf("incremental content: %q %v", b, err)
	}
	if dst.Origin("shop", "data") != "" {
		t.Fatal("an unmarked dataset has an origin")
	}
	if err := dst.SetOrigin("shop", "data", "m2"); err != nil {
		t.Fatal(err)
	}
	if got := dst.Origin("shop", "data"); got != "m2" {
		t.Fatalf("origin %q", got)
	}
	if _, err := dst.Snapshot("shop", "data", "operator-kept"); err != nil {
		t.Fatal(err)
	}
	if err := dst.PruneSnapshots("shop", "data", "drover-m2-1"); err != nil {
		t.Fatal(err)
	}
	after, err := dst.Get("shop", "data")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range after.Snapshots {
		names = append(names, s.Name)
	}
	if len(names) != 2 || names[0] != "drover-m2-1" || names[1] != "operator-kept" {
		t.Fatalf("snapshots after pruning: %v (want drover-m2-1 and the operator's, not drover-m1-final)", names)
	}
}

// An aborted move's snapshots go on both sides, and a copy holding
// snapshots newer than the base (an abort not yet undone there) takes the
// next incremental once rolled back to it — zfs-fuse refuses it before.
func TestAbortedMoveSnapshotsGoAndACopyRollsBackToItsBase(t *testing.T) {
	withPools(t, "dvasrc", "dvadst")
	src, err := NewZFS("dvasrc/drover")
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewZFS("dvadst/drover")
	if err != nil {
		t.Fatal(err)
	}
	info, err := src.Ensure("shop", "data", Properties{Quota: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	send := func(snap, base string) *bytes.Buffer {
		t.Helper()
		var b bytes.Buffer
		if err := src.Send("shop", "data", snap, base, &b); err != nil {
			t.Fatal(err)
		}
		return &b
	}
	snapshot := func(name string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(info.Mountpoint, name), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := src.Snapshot("shop", "data", name); err != nil {
			t.Fatal(err)
		}
	}
	names := func(z *ZFS) []string {
		t.Helper()
		got, err := z.Get("shop", "data")
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, s := range got.Snapshots {
			out = append(out, s.Name)
		}
		return out
	}
	kept := dst.Dataset("shop", "data")
	snapshot("drover-m1-final")
	if err := dst.Receive(kept, send("drover-m1-final", "")); err != nil {
		t.Fatal(err)
	}
	// m2 sends two rounds, then aborts; its target is not told.
	snapshot("drover-m2-1")
	if err := dst.ReceiveInto(kept, true, send("drover-m2-1", "drover-m1-final")); err != nil {
		t.Fatal(err)
	}
	snapshot("drover-m2-2")
	if err := dst.ReceiveInto(kept, true, send("drover-m2-2", "drover-m2-1")); err != nil {
		t.Fatal(err)
	}
	if err := src.DestroySnapshotsOf("shop", "data", "drover-m2-"); err != nil {
		t.Fatal(err)
	}
	if got := names(src); len(got) != 1 || got[0] != "drover-m1-final" {
		t.Fatalf("source snapshots after the abort: %v, want drover-m1-final alone", got)
	}
	if err := src.DestroySnapshotsOf("shop", "data", SnapshotPrefix); err == nil {
		t.Fatal("destroying every drover snapshot was not refused")
	}
	// m3 starts from the newest common snapshot, m1's final: the target
	// still holds m2's, and zfs-fuse refuses an increment onto them.
	snapshot("drover-m3-1")
	// The lab's zfs-fuse refuses it and leaves the copy as it was (OpenZFS
	// with -F would roll back by itself); drover does not rely on either.
	err = dst.ReceiveInto(kept, true, send("drover-m3-1", "drover-m1-final"))
	if err == nil || !strings.Contains(err.Error(), "cannot receive incremental stream") {
		t.Fatalf("zfs-fuse took an increment onto a copy with newer snapshots: %v", err)
	}
	if got := names(dst); len(got) != 3 || got[2] != "drover-m2-2" {
		t.Fatalf("the refused increment changed the copy's snapshots: %v", got)
	}
	if err := dst.RollbackTo(kept, "drover-m1-final"); err != nil {
		t.Fatal(err)
	}
	if got := names(dst); len(got) != 1 || got[0] != "drover-m1-final" {
		t.Fatalf("target snapshots after the rollback: %v, want drover-m1-final alone", got)
	}
	if err := dst.ReceiveInto(kept, true, send("drover-m3-1", "drover-m1-final")); err != nil {
		t.Fatalf("increment from the base after the rollback: %v", err)
	}
	got, err := dst.Get("shop", "data")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"drover-m2-2", "drover-m3-1"} {
		if b, err := os.ReadFile(filepath.Join(got.Mountpoint, f)); err != nil || string(b) != f {
			t.Fatalf("%s on the target after m3's round: %q %v", f, b, err)
		}
	}
	if err := dst.RollbackTo("elsewhere/x", "s"); err == nil {
		t.Fatal("a rollback outside the parent was not refused")
	}
}
