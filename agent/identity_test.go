package agent

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMachineIDIsMadeOnceAndKept(t *testing.T) {
	dir := t.TempDir()
	a, err := loadOrCreateMachineID(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := loadOrCreateMachineID(dir)
	if err != nil || a != b {
		t.Fatalf("second load: %q, %v; want %q", b, err, a)
	}
	fi, _ := os.Stat(filepath.Join(dir, machineIDFile))
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", fi.Mode().Perm())
	}
	os.WriteFile(filepath.Join(dir, machineIDFile), []byte("../../etc\n"), 0o600)
	if _, err := loadOrCreateMachineID(dir); err == nil {
		t.Fatal("a corrupt machine id was accepted")
	}
}

func TestJoinTokenRoundTrip(t *testing.T) {
	key, _ := newClusterKey()
	tok, err := makeToken(key, []string{"10.0.0.1:7946"})
	if err != nil {
		t.Fatal(err)
	}
	k, addrs, err := parseToken(tok)
	if err != nil || !bytes.Equal(k, key) || len(addrs) != 1 || addrs[0] != "10.0.0.1:7946" {
		t.Fatalf("parse: %v %v %v", k, addrs, err)
	}
	for _, bad := range []string{"", "drover1.", "drover1.!!!", "other." + tok[len(tokenPrefix):], tok[:len(tok)-4]} {
		if _, _, err := parseToken(bad); !errors.Is(err, ErrBadToken) {
			t.Errorf("token %q: got %v, want ErrBadToken", bad, err)
		}
	}
}

// --init over a data dir that was in a cluster and lost its Raft state
// is refused before anything starts: never a silent new cluster under the
// old key and machine id.
func TestInitRefusedOverAnEarlierCluster(t *testing.T) {
	dir := t.TempDir()
	if err := saveKey(dir, bytes.Repeat([]byte{7}, 32)); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, overlayIPFile), []byte("10.210.0.1\n"), 0o600)
	cfg := Config{Name: "a", DataDir: dir, Socket: filepath.Join(dir, "d.sock"), BindAddr: netip.MustParseAddr("127.0.0.1"), Init: true}
	err := Run(context.Background(), cfg)
	if !errors.Is(err, ErrReinit) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("Run --init over a lost Raft state: %v", err)
	}
	if _, err := os.Stat(cfg.Socket); !os.IsNotExist(err) {
		t.Fatal("the daemon started before refusing")
	}
}
