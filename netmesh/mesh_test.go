package netmesh

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/drover-sh/drover/internal/testpoll"
	"go.uber.org/goleak"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestKeyMadeOnceAndKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wg.key")
	a, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreateKey(path)
	if err != nil || a != b {
		t.Fatalf("second load gave another key or %v", err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", fi.Mode().Perm())
	}
	os.WriteFile(path, []byte("not a key\n"), 0o600)
	if _, err := LoadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("corrupt key: %v", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "not a key\n" {
		t.Fatal("a corrupt key file was replaced")
	}
}

// The mesh test runs each node as this test binary re-executed inside a
// network namespace (TestMain sees DROVER_MESH_NODE), so the TUN device and
// the UDP socket are created in that namespace. A node applies the Config
// in its config file at start and on SIGHUP, and writes its Status to its
// status file every 100ms.
func TestMain(m *testing.M) {
	if cfgPath := os.Getenv("DROVER_MESH_NODE"); cfgPath != "" {
		if err := meshNode(cfgPath); err != nil {
			fmt.Fprintln(os.Stderr, "mesh node:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type nodeConfig struct {
	Device string
	Config Config
}

func meshNode(cfgPath string) error {
	read := func() (nodeConfig, error) {
		var nc nodeConfig
		b, err := os.ReadFile(cfgPath)
		if err == nil {
			err = json.Unmarshal(b, &nc)
		}
		return nc, err
	}
	nc, err := read()
	if err != nil {
		return err
	}
	d, err := Open(nc.Device, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		return err
	}
	defer d.Close()
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGHUP, syscall.SIGTERM)
	apply := func() error {
		nc, err := read()
		if err != nil {
			return err
		}
		return d.Set(nc.Config)
	}
	if err := apply(); err != nil {
		return err
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := d.Status()
		if err != nil {
			return err
		}
		b, _ := json.Marshal(st)
		os.WriteFile(cfgPath+".status.tmp", b, 0o600)
		os.Rename(cfgPath+".status.tmp", cfgPath+".status")
		select {
		case s := <-sig:
			if s == syscall.SIGTERM {
				return nil
			}
			if err := apply(); err != nil {
				return err
			}
		case <-tick.C:
		}
	}
}

const nsPrefix = "dmtest"

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

func cleanupNetns() {
	for _, ns := range []string{nsPrefix + "1", nsPrefix + "2"} {
		exec.Command("ip", "netns", "pids", ns).Run()
		if out, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
			for _, pid := range strings.Fields(string(out)) {
				exec.Command("kill", "-9", pid).Run()
			}
		}
		exec.Command("ip", "netns", "del", ns).Run()
	}
}

type meshNodeProc struct {
	cfgPath string
	cmd     *exec.Cmd
	cfg     nodeConfig
	ns      string
}

func (n *meshNodeProc) write(t *testing.T) {
	b, _ := json.Marshal(n.cfg)
	if err := os.WriteFile(n.cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (n *meshNodeProc) reload(t *testing.T) {
	n.write(t)
	sent := time.Now()
	n.cmd.Process.Signal(syscall.SIGHUP)
	testpoll.Until(t, 5*time.Second, "status after reload", func() error {
		after, err := os.Stat(n.cfgPath + ".status")
		if err != nil || !after.ModTime().After(sent.Add(150*time.Millisecond)) {
			return errors.New("no fresh status")
		}
		return nil
	})
}

func (n *meshNodeProc) status(t *testing.T) Status {
	var st Status
	b, err := os.ReadFile(n.cfgPath + ".status")
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil {
		t.Fatalf("status of %s: %v", n.ns, err)
	}
	return st
}

func TestMeshBetweenNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	cleanupNetns()
	t.Cleanup(cleanupNetns)
	run(t, "ip", "netns", "add", nsPrefix+"1")
	run(t, "ip", "netns", "add", nsPrefix+"2")
	run(t, "ip", "link", "add", "dmt-a", "netns", nsPrefix+"1", "type", "veth", "peer", "name", "dmt-b", "netns", nsPrefix+"2")
	for i, side := range []string{"a", "b"} {
		ns := fmt.Sprintf("%s%d", nsPrefix, i+1)
		run(t, "ip", "-n", ns, "addr", "add", fmt.Sprintf("192.168.250.%d/24", i+1), "dev", "dmt-"+side)
		run(t, "ip", "-n", ns, "link", "set", "dmt-"+side, "up")
		run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}

	dir := t.TempDir()
	keys := []wgtypes.Key{}
	for i := 0; i < 2; i++ {
		k, _ := wgtypes.GeneratePrivateKey()
		keys = append(keys, k)
	}
	overlay := []netip.Prefix{netip.MustParsePrefix("10.210.0.1/16"), netip.MustParsePrefix("10.210.0.2/16")}
	nodes := make([]*meshNodeProc, 2)
	for i := range nodes {
		other := 1 - i
		n := &meshNodeProc{cfgPath: filepath.Join(dir, fmt.Sprintf("node%d.json", i+1)), ns: fmt.Sprintf("%s%d", nsPrefix, i+1)}
		n.cfg = nodeConfig{Device: fmt.Sprintf("dmtwg%d", i+1), Config: Config{
			PrivateKey: keys[i], ListenPort: 51820, Address: overlay[i],
			Peers: []Peer{{
				PublicKey:  keys[other].PublicKey(),
				Endpoint:   netip.MustParseAddrPort(fmt.Sprintf("192.168.250.%d:51820", other+1)),
				AllowedIPs: []netip.Prefix{netip.PrefixFrom(overlay[other].Addr(), 32)},
				KeepAlive:  time.Second,
			}},
		}}
		n.write(t)
		n.cmd = exec.Command("nsenter", "--net=/var/run/netns/"+n.ns, os.Args[0], "-test.run=^$")
		n.cmd.Env = append(os.Environ(), "DROVER_MESH_NODE="+n.cfgPath)
		logf, _ := os.Create(n.cfgPath + ".log")
		n.cmd.Stdout, n.cmd.Stderr = logf, logf
		if err := n.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			n.cmd.Process.Signal(syscall.SIGTERM)
			n.cmd.Wait()
			logf.Close()
			if t.Failed() {
				b, _ := os.ReadFile(n.cfgPath + ".log")
				t.Logf("%s log:\n%s", n.ns, b)
			}
		})
		nodes[i] = n
	}
	// Traffic over the overlay, and a handshake seen by wgctrl.
	testpoll.Until(t, 20*time.Second, "ping over the overlay", func() error {
		out, err := exec.Command("ip", "netns", "exec", nsPrefix+"1", "ping", "-c1", "-W1", "10.210.0.2").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	var st Status
	testpoll.Until(t, 5*time.Second, "handshake and bytes in the status", func() error {
		if _, err := os.Stat(nodes[0].cfgPath + ".status"); err != nil {
			return err
		}
		st = nodes[0].status(t)
		if st.Kind != KindUserspace && st.Kind != KindKernel || len(st.Peers) != 1 || st.Peers[0].LastHandshake.IsZero() || st.Peers[0].RxBytes == 0 {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	handshake := st.Peers[0].LastHandshake

	// Set again with the same config: the session is kept.
	nodes[0].reload(t)
	if st := nodes[0].status(t); !st.Peers[0].LastHandshake.Equal(handshake) {
		t.Fatalf("re-applying the same config reset the session: %v -> %v", handshake, st.Peers[0].LastHandshake)
	}

	// A service /32 outside the overlay prefix gets a route via the device.
	nodes[0].cfg.Config.Peers[0].AllowedIPs = append(nodes[0].cfg.Config.Peers[0].AllowedIPs, netip.MustParsePrefix("10.211.0.7/32"))
	nodes[0].reload(t)
	if out := run(t, "ip", "-n", nsPrefix+"1", "route", "show", "10.211.0.7"); !strings.Contains(out, "dmtwg1") {
		t.Fatalf("no route for the service IP via the device: %q", out)
	}

	// An endpoint change is applied. WireGuard roams a peer's endpoint to
	// the source of its authenticated packets, so the peer is stopped first:
	// its next keepalive would otherwise put the old endpoint back.
	nodes[1].cmd.Process.Signal(syscall.SIGTERM)
	nodes[1].cmd.Wait()
	nodes[0].cfg.Config.Peers[0].Endpoint = netip.MustParseAddrPort("192.168.250.2:51999")
	nodes[0].reload(t)
	if ep := nodes[0].status(t).Peers[0].Endpoint; ep != "192.168.250.2:51999" {
		t.Fatalf("endpoint after change: %s", ep)
	}

	// A peer dropped from the config disappears, and so does its route.
	nodes[0].cfg.Config.Peers = nil
	nodes[0].reload(t)
	if st := nodes[0].status(t); len(st.Peers) != 0 {
		t.Fatalf("peers after removal: %+v", st.Peers)
	}
	if out := run(t, "ip", "-n", nsPrefix+"1", "route", "show", "10.211.0.7"); strings.Contains(out, "dmtwg1") {
		t.Fatalf("route of a removed peer is left: %q", out)
	}
}

func TestCloseLeavesNoInterfaceNorGoroutine(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	k, _ := wgtypes.GeneratePrivateKey()
	d, err := Open("dmtleak0", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Set(Config{PrivateKey: k, ListenPort: 51899, Address: netip.MustParsePrefix("10.213.0.1/24")}); err != nil {
		d.Close()
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	testpoll.Until(t, 5*time.Second, "interface removed", func() error {
		if out, _ := exec.Command("ip", "link", "show", "dmtleak0").CombinedOutput(); !strings.Contains(string(out), "does not exist") {
			return errors.New(string(out))
		}
		return nil
	})
}

// A peer as wgctrl reads it back from the device is the same as the one
// configured: an IPv4 endpoint may come back as a 16-byte address.
func TestSamePeerAsReadBack(t *testing.T) {
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	want := Peer{
		PublicKey: key.PublicKey(), Endpoint: netip.MustParseAddrPort("10.77.0.1:51820"), KeepAlive: 25 * time.Second,
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.210.0.1/32"), netip.MustParsePrefix("10.211.0.4/32")},
	}
	read := wgtypes.Peer{
		PublicKey: key.PublicKey(), PersistentKeepaliveInterval: 25 * time.Second,
		Endpoint:   &net.UDPAddr{IP: net.ParseIP("10.77.0.1"), Port: 51820}, // 16 bytes
		AllowedIPs: []net.IPNet{prefixToIPNet(want.AllowedIPs[1]), prefixToIPNet(want.AllowedIPs[0])},
	}
	if !samePeer(read, want) {
		t.Fatal("a peer read back as configured is seen as changed")
	}
	read.Endpoint.Port = 51821
	if samePeer(read, want) {
		t.Fatal("a peer with another endpoint port is seen as the same")
	}
}

// droverd never deletes an interface it did not make; its own leftover it
// replaces.
func TestOpenLeavesOthersInterfacesAlone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	run(t, "ip", "link", "add", "dmtother0", "type", "veth", "peer", "name", "dmtother1")
	defer exec.Command("ip", "link", "del", "dmtother0").Run()
	if _, err := Open("dmtother0", nil); !errors.Is(err, ErrNotOurs) || !strings.Contains(err.Error(), "dmtother0") {
		t.Fatalf("opening over another's interface: %v", err)
	}
	if out, err := exec.Command("ip", "link", "show", "dmtother0").CombinedOutput(); err != nil {
		t.Fatalf("the other interface is gone: %s", out)
	}
	first, err := Open("dmtown0", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if out, _ := exec.Command("ip", "link", "show", "dmtown0").CombinedOutput(); !strings.Contains(string(out), "alias "+OwnAlias) {
		t.Fatalf("droverd's interface is not marked:\n%s", out)
	}
	second, err := Open("dmtown0", nil) // as a restarted daemon finds its own leftover
	if err != nil {
		t.Fatalf("replacing its own leftover: %v", err)
	}
	second.Close()
}
