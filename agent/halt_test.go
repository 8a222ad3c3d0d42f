package agent

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/internal/testpoll"
)

// A fact store that halts ends Run with an error naming the entry, soon:
// a daemon that hung there would never be restarted by systemd.
func TestHaltedFactStoreEndsRun(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("droverd opens a WireGuard device: needs root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	dir := t.TempDir()
	cfg := Config{Name: "halt", DataDir: filepath.Join(dir, "data"), Socket: filepath.Join(dir, "d.sock"),
		BindAddr: netip.MustParseAddr("127.0.3.1"), GossipPort: 17946, RaftPort: 17947, RPCPort: 17948,
		WGInterface: "drvhalt0", WGPort: 51879, OverlayPrefix: netip.MustParsePrefix("10.219.0.0/16"),
		ServicePrefix: netip.MustParsePrefix("10.218.0.0/16"), DockerHost: "unix://" + filepath.Join(dir, "no-docker.sock"),
		Init: true, OpenOverlay: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Timing: cluster.Timing{RaftHeartbeat: 200 * time.Millisecond}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ended := make(chan error, 1)
	go func() { ended <- Run(ctx, cfg) }()
	client := &ctlapi.Client{SocketPath: cfg.Socket}
	testpoll.Until(t, 30*time.Second, "a leader", func() error {
		st, err := client.Status(ctx)
		if err == nil && st.Role != cluster.RoleLeader {
			err = errors.New("role " + st.Role)
		}
		return err
	})
	// An entry no droverd can decode, sent as a holder of the key would.
	keys, err := readKeyFile(filepath.Join(cfg.DataDir, clusterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, keys[0])
	mac.Write([]byte("drover rpc v1"))
	req, _ := http.NewRequest(http.MethodPost, "http://10.219.0.1:17948/rpc/v1/apply", bytes.NewReader([]byte{0xff, '{', '}'}))
	req.Header.Set("Drover-Cluster-Auth", hex.EncodeToString(mac.Sum(nil)))
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
	select {
	case err := <-ended:
		if err == nil || !strings.Contains(err.Error(), "fact store halted") || !strings.Contains(err.Error(), "log index") {
			t.Fatalf("Run ended with %v; want the halt, naming the entry", err)
		}
	case <-time.After(2 * haltTeardown):
		t.Fatal("Run did not end after the fact store halted")
	}
}
