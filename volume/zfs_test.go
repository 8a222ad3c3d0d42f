package volume

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

// withPools makes real ZFS pools (zfs-fuse here) for the test and puts the
// lab's zfs shim first on PATH, as the lab does; both go at the end.
func withPools(t *testing.T, names ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for ZFS pools")
	}
	if err := exec.Command("zpool", "list").Run(); err != nil {
		t.Skip("no ZFS (zpool list fails): run `make deps`")
	}
	_, file, _, _ := runtime.Caller(0)
	shim := filepath.Join(filepath.Dir(filepath.Dir(file)), "lab", "zfs-shim")
	t.Setenv("PATH", shim+":"+os.Getenv("PATH"))
	dir := t.TempDir()
	for _, n := range names {
		exec.Command("zpool", "destroy", "-f", n).Run()
		img := filepath.Join(dir, n+".img")
		if err := exec.Command("truncate", "-s", "256M", img).Run(); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("zpool", "create", "-f", "-m", filepath.Join(dir, "mnt-"+n), n, img).CombinedOutput(); err != nil {
			t.Fatalf("zpool create %s: %v\n%s", n, err, out)
		}
		t.Cleanup(func() { exec.Command("zpool", "destroy", "-f", n).Run() })
	}
}

func TestVolumeLifecycleAndIncrementalSend(t *testing.T) {
	withPools(t, "dvtsrc", "dvtdst")
	src, err := NewZFS("dvtsrc/drover")
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewZFS("dvtdst/drover")
	if err != nil {
		t.Fatal(err)
	}
	info, err := src.Ensure("shop", "data", Properties{Quota: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if info.QuotaBytes != 64<<20 || info.Dataset != "dvtsrc/drover/shop/data" || info.Mountpoint == "" {
		t.Fatalf("info %+v", info)
	}
	if again, err := src.Ensure("shop", "data", Properties{Quota: 64 << 20}); err != nil || again.Dataset != info.Dataset {
		t.Fatalf("ensure is not idempotent: %+v %v", again, err)
	}
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(info.Mountpoint, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a", "first")
	s1, err := src.Snapshot("shop", "data", "s1")
	if err != nil || s1.GUID == 0 {
		t.Fatalf("snapshot: %+v %v", s1, err)
	}
	write("b", "second")
	if _, err := src.Snapshot("shop", "data", "s2"); err != nil {
		t.Fatal(err)
	}

	// Full send of s1, then incremental s1 -> s2, through pipes.
	sendRecv := func(snap, base string) {
		t.Helper()
		pr, pw := io.Pipe()
		errc := make(chan error, 1)
		go func() { errc <- pw.CloseWithError(src.Send("shop", "data", snap, base, pw)) }()
		if err := dst.Receive(dst.Dataset("shop", "data"), pr); err != nil {
			t.Fatalf("receive %s: %v", snap, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("send %s: %v", snap, err)
		}
	}
	sendRecv("s1", "")
	sendRecv("s2", "s1")
	got, err := dst.Get("shop", "data")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Snapshots) != 2 || got.Snapshots[0].GUID != s1.GUID {
		t.Fatalf("received snapshots %+v, want s1 (guid %d) and s2", got.Snapshots, s1.GUID)
	}
	for name, want := range map[string]string{"a": "first", "b": "second"} {
		b, err := os.ReadFile(filepath.Join(got.Mountpoint, name))
		if err != nil || !bytes.Equal(b, []byte(want)) {
			t.Fatalf("received %s = %q, %v", name, b, err)
		}
	}
	list, err := dst.List()
	if err != nil || len(list) != 1 || list[0].Name != "data" || list[0].Namespace != "shop" {
		t.Fatalf("list %+v %v", list, err)
	}
	if free, err := dst.FreeBytes(); err != nil || free == 0 {
		t.Fatalf("free %d %v", free, err)
	}
	if err := src.Destroy("shop", "data"); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Get("shop", "data"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after destroy: %v", err)
	}
	// Quota is enforced by ZFS (random bytes: compression is on by
	// default, and a repeated byte would take no room).
	big := make([]byte, 1<<20)
	rand.Read(big)
	small, err := dst.Ensure("shop", "tiny", Properties{Quota: 1 << 20, RecordSize: 8 << 10})
	if err != nil {
		t.Fatal(err)
	}
	// The properties asked for are set, the defaults where none is asked.
	props, err := exec.Command("zfs", "get", "-Hp", "-o", "value", "recordsize,compression", small.Dataset).Output()
	if err != nil || strings.Join(strings.Fields(string(props)), " ") != "8192 "+DefaultCompression {
		t.Fatalf("properties of %s: %q, %v", small.Dataset, props, err)
	}
	var werr error
	for i := 0; i < 4 && werr == nil; i++ {
		werr = os.WriteFile(filepath.Join(small.Mountpoint, fmt.Sprint(i)), big, 0o644)
	}
	if werr == nil {
		t.Fatal("writing 4 MiB into a 1 MiB quota succeeded")
	}
}

// Get reads a volume and its snapshots in one command: oldest first by
// creation, whatever their names, each with the guid zfs reports for it.
func TestGetListsSnapshotsOldestFirstWithTheirGUIDs(t *testing.T) {
	withPools(t, "dvtget")
	z, err := NewZFS("dvtget/drover")
	if err != nil {
		t.Fatal(err)
	}
	info, err := z.Ensure("shop", "data", Properties{Quota: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	var want []Snapshot
	for _, name := range []string{"zeta", "alpha", "mid"} {
		s, err := z.Snapshot("shop", "data", name)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, s)
	}
	if out, err := exec.Command("zfs", "destroy", info.Dataset+"@alpha").CombinedOutput(); err != nil {
		t.Fatalf("destroying a snapshot: %v: %s", err, out)
	}
	want = append(want[:1], want[2])
	got, err := z.Get("shop", "data")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Snapshots, want) {
		t.Errorf("snapshots %+v, want %+v", got.Snapshots, want)
	}
	if got.QuotaBytes != 64<<20 || got.Mountpoint == "" || got.ReferencedBytes == 0 {
		t.Errorf("dataset read as %+v", got)
	}
	if _, err := z.Get("shop", "nothing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("a volume with no dataset: %v, want ErrNotFound", err)
	}
}

func TestParseInfoOrdersByCreationAndRefusesWhatItCannotRead(t *testing.T) {
	const ds = "p/drover/shop/data"
	out := strings.Join([]string{
		ds + "\tguid\t1", ds + "\tcreatetxg\t5", ds + "\tmountpoint\t/m", ds + "\tquota\tnone",
		ds + "\tused\t10", ds + "\treferenced\t9",
		ds + "@late\tguid\t30", ds + "@late\tcreatetxg\t90", ds + "@late\tquota\t-",
		ds + "@early\tguid\t20", ds + "@early\tcreatetxg\t7",
		ds + "/child\tguid\t40", ds + "/child\tcreatetxg\t8",
	}, "\n") + "\n"
	got, err := parseInfo("shop", "data", ds, out)
	if err != nil {
		t.Fatal(err)
	}
	want := Info{Namespace: "shop", Name: "data", Dataset: ds, Mountpoint: "/m", UsedBytes: 10, ReferencedBytes: 9,
		Snapshots: []Snapshot{{Name: "early", GUID: 20}, {Name: "late", GUID: 30}}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
	for name, bad := range map[string]string{
		"two fields": ds + "\tguid\n",
		"a size":     ds + "\tused\t12K\n",
		"no guid":    ds + "@s\tcreatetxg\t3\n",
		"a bad guid": ds + "@s\tguid\tx\n",
		"a bad txg":  ds + "@s\tguid\t3\n" + ds + "@s\tcreatetxg\t-3\n",
	} {
		if _, err := parseInfo("shop", "data", ds, bad); err == nil || !strings.Contains(err.Error(), ds) {
			t.Errorf("%s: %v, want an error naming %s", name, err, ds)
		}
	}
}
