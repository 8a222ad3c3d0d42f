package volume

import (
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// pipeSend streams src's snapshot (from base) into recv.
func pipeSend(t *testing.T, src *ZFS, snap, base string, recv func(io.Reader) error) {
	t.Helper()
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(src.Send("shop", "data", snap, base, pw)) }()
	if err := recv(pr); err != nil {
		t.Fatal(err)
	}
}

func TestStandbyCopyStaysUnmountedAndADivergedOwnerSetsAside(t *testing.T) {
	withPools(t, "dvsown", "dvssby")
	owner, _ := NewZFS("dvsown/drover")
	standby, _ := NewZFS("dvssby/drover")
	info, err := owner.Ensure("shop", "data", Properties{})
	if err != nil {
		t.Fatal(err)
	}
	write := func(dir, name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(info.Mountpoint, "a", "one")
	s1 := StandbySnapshotPrefix + "1"
	if _, err := owner.Snapshot("shop", "data", s1); err != nil {
		t.Fatal(err)
	}
	pipeSend(t, owner, s1, "", func(r io.Reader) error { return standby.ReceiveStandby("shop", "data", "shop/db", false, r) })
	ds := standby.Dataset("shop", "data")
	if zfsGet("mounted", ds) != "no" || standby.StandbyOf("shop", "data") != "shop/db" {
		t.Fatalf("standby copy mounted=%s mark=%q", zfsGet("mounted", ds), standby.StandbyOf("shop", "data"))
	}
	write(info.Mountpoint, "b", "two")
	s2 := StandbySnapshotPrefix + "2"
	owner.Snapshot("shop", "data", s2)
	pipeSend(t, owner, s2, s1, func(r io.Reader) error { return standby.ReceiveStandby("shop", "data", "shop/db", true, r) })
	if zfsGet("mounted", ds) != "no" {
		t.Fatal("an increment mounted the standby copy")
	}
	// The failover: the standby serves its copy, with s2's data.
	got, err := standby.Ensure("shop", "data", Properties{})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(got.Mountpoint, "b")); err != nil || string(b) != "two" {
		t.Fatalf("after activation: %q %v", b, err)
	}
	if standby.StandbyOf("shop", "data") != "" || zfsGet("canmount", ds) != "on" {
		t.Fatal("an activated copy is still marked standby")
	}
	// The old owner wrote after s2; it sets its copy aside and becomes
	// the standby at s2.
	write(info.Mountpoint, "c", "lost after the failover")
	kept, written, err := owner.SetAsideDiverged("shop", "data", s2, "shop/db", time.Unix(1700000000, 0))
	if err != nil {
		t.Fatal(err)
	}
	if kept != "dvsown/drover-diverged/shop/data-1700000000" || written == 0 {
		t.Fatalf("kept %s, written %d", kept, written)
	}
	if owner.StandbyOf("shop", "data") != "shop/db" || zfsGet("mounted", owner.Dataset("shop", "data")) != "no" {
		t.Fatal("the old owner's copy in place is not a standby copy")
	}
	// The new owner sends what it wrote since s2 to the old owner.
	write(got.Mountpoint, "d", "new owner")
	s3 := StandbySnapshotPrefix + "3"
	standby.Snapshot("shop", "data", s3)
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(standby.Send("shop", "data", s3, s2, pw)) }()
	if err := owner.ReceiveStandby("shop", "data", "shop/db", true, pr); err != nil {
		t.Fatal(err)
	}
	if err := owner.PruneStandbySnapshots("shop", "data", 1); err != nil {
		t.Fatal(err)
	}
	// The diverged copy holds what the old owner wrote after s2.
	if _, err := zfsRun("mount", kept); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(zfsGet("mountpoint", kept), "c")); err != nil || string(b) != "lost after the failover" {
		t.Fatalf("the diverged copy: %q %v", b, err)
	}
	if info, _ := owner.Get("shop", "data"); len(info.Snapshots) == 0 || info.Snapshots[len(info.Snapshots)-1].Name != s3 {
		t.Fatalf("the old owner's standby copy: %+v", info.Snapshots)
	}
}
