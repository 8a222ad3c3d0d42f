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
	"time"

	"github.com/drover-sh/drover/fsm"
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
	now := time.Now()
	g := fsm.JoinGrant{ID: "0123abcd", Secret: bytes.Repeat([]byte{9}, 32), ExpiresAt: now.Add(time.Hour)}
	tok, err := makeToken(key, []string{"10.0.0.1:7946"}, g)
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseToken(tok, now)
	if err != nil || !bytes.Equal(got.key, key) || len(got.addrs) != 1 || got.addrs[0] != "10.0.0.1:7946" ||
		got.grant != g.ID || !bytes.Equal(got.secret, g.Secret) || !got.expires.Equal(g.ExpiresAt) {
		t.Fatalf("parse: %+v %v", got, err)
	}
	for _, bad := range []string{"", "drover2.", "drover2.!!!", "drover1.e30", "other." + tok[len(tokenPrefix):], tok[:len(tok)-4]} {
		if _, err := parseToken(bad, now); !errors.Is(err, ErrBadToken) {
			t.Errorf("token %q: got %v, want ErrBadToken", bad, err)
		}
	}
	// An expired token is refused before anything starts, naming its expiry.
	if _, err := parseToken(tok, now.Add(2*time.Hour)); !errors.Is(err, ErrBadToken) || !strings.Contains(err.Error(), "expired at") {
		t.Fatalf("expired token: %v", err)
	}
}

func TestKeyFileHoldsTheKeyringPrimaryFirst(t *testing.T) {
	dir := t.TempDir()
	k1, k2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	if err := saveKeys(dir, [][]byte{k2, k1}); err != nil {
		t.Fatal(err)
	}
	keys, err := readKeyFile(filepath.Join(dir, clusterKeyFile))
	if err != nil || len(keys) != 2 || !bytes.Equal(keys[0], k2) || !bytes.Equal(keys[1], k1) {
		t.Fatalf("read back %v %v", keys, err)
	}
	os.WriteFile(filepath.Join(dir, clusterKeyFile), []byte(encodeKey(k1)+"\nnot-a-key\n"), 0o600)
	if _, err := readKeyFile(filepath.Join(dir, clusterKeyFile)); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("a bad second line: %v", err)
	}
}

// --init over a data dir that was in a cluster and lost its Raft state
// is refused before anything starts: never a silent new cluster under the
// old key and machine id.
func TestInitRefusedOverAnEarlierCluster(t *testing.T) {
	dir := t.TempDir()
	if err := saveKeys(dir, [][]byte{bytes.Repeat([]byte{7}, 32)}); err != nil {
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
