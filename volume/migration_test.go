package volume

import (
	"bytes"
	"os"
	"path/filepath"
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
