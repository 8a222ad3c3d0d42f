package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
)

// TestBinariesFormCluster starts three real droverd processes on loopback
// addresses, each with its own data dir and socket, and drives them with
// the real droverctl: the first inits, the others join with its token.
func TestBinariesFormCluster(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("droverd opens a WireGuard device: needs root")
	}
	bin := binaries(t)
	notify := listenNotify(t)
	var daemons []*daemonProc
	for i := 1; i <= 3; i++ {
		if i == 1 {
			os.Setenv("NOTIFY_SOCKET", notify.path)
		}
		d := startDaemon(t, bin, fmt.Sprintf("b%d", i), netip.AddrFrom4([4]byte{127, 0, 2, byte(i)}),
			"--wg-interface", fmt.Sprintf("drvb%d", i), "--wg-port", fmt.Sprint(51840+i),
			// Three machines in one network namespace are each other's
			// local processes; the lab tests run with the guard.
			"--open-overlay-ports")
		os.Unsetenv("NOTIFY_SOCKET")
		daemons = append(daemons, d)
	}
	testpoll.Until(t, 10*time.Second, "READY=1 from b1", func() error { return notify.saw("READY=1") })
	// Before init or join the CLI says the machine is in no cluster.
	out, err := daemons[0].ctl(t, "machine", "ls")
	if err == nil || !strings.Contains(out, "no cluster") {
		t.Fatalf("machine ls before init: err %v, output %q", err, out)
	}
	if out, err := daemons[0].ctl(t, "cluster", "init"); err != nil {
		t.Fatalf("cluster init: %v\n%s", err, out)
	}
	tokenJSON, err := daemons[0].ctl(t, "cluster", "join-token", "--json")
	if err != nil {
		t.Fatalf("join-token: %v\n%s", err, tokenJSON)
	}
	var tok struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(tokenJSON), &tok); err != nil || tok.Token == "" {
		t.Fatalf("join-token --json gave %q: %v", tokenJSON, err)
	}
	// The token is a secret: a file for one machine, standard input for
	// the other, never an argument.
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(tok.Token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := daemons[1].ctl(t, "cluster", "join", "--token-file", tokenFile); err != nil {
		t.Fatalf("%s: cluster join --token-file: %v\n%s", daemons[1].name, err, out)
	}
	if out, err := daemons[2].ctlInput(t, tok.Token+"\n", "cluster", "join"); err != nil {
		t.Fatalf("%s: cluster join from stdin: %v\n%s", daemons[2].name, err, out)
	}

	type machine struct {
		Name     string `json:"name"`
		State    string `json:"state"`
		Liveness string `json:"liveness"`
		RaftRole string `json:"raft_role"`
	}
	testpoll.Until(t, 60*time.Second, "3 machines, one leader, all alive, on every daemon", func() error {
		for _, d := range daemons {
			out, err := d.ctl(t, "machine", "ls", "--json")
			if err != nil {
				return fmt.Errorf("%s: %v: %s", d.name, err, out)
			}
			var ms []machine
			if err := json.Unmarshal([]byte(out), &ms); err != nil {
				return fmt.Errorf("%s: machine ls --json: %v: %s", d.name, err, out)
			}
			leaders, alive := 0, 0
			for _, m := range ms {
				if m.RaftRole == "leader" {
					leaders++
				}
				if m.Liveness == "alive" && m.State == "active" {
					alive++
				}
			}
			if len(ms) != 3 || leaders != 1 || alive != 3 {
				return fmt.Errorf("%s sees %d machines, %d leaders, %d alive and active: %s", d.name, len(ms), leaders, alive, out)
			}
		}
		return nil
	})
	testpoll.Until(t, 10*time.Second, "b1 reporting its Raft role to systemd", func() error { return notify.saw("STATUS=raft leader") })
	out, err = daemons[2].ctl(t, "cluster", "status")
	if err != nil || !strings.Contains(out, "b1") {
		t.Fatalf("cluster status: %v\n%s", err, out)
	}

	// A probe from a follower commits every entry through the leader; the
	// figures it reports are consistent with each other.
	out, err = daemons[2].ctl(t, "cluster", "probe", "--count", "40", "--proposers", "4", "--json")
	var probe ctlapi.ProbeResult
	if err != nil || json.Unmarshal([]byte(out), &probe) != nil {
		t.Fatalf("cluster probe: %v\n%s", err, out)
	}
	if probe.Committed != 40 || probe.Failed != 0 || probe.Proposers != 4 || probe.Machine != "b3" || probe.Leader != "b1" ||
		!(0 < probe.P50 && probe.P50 <= probe.P90 && probe.P90 <= probe.P99 && probe.P99 <= probe.Max && probe.PerSecond > 0) {
		t.Fatalf("cluster probe result: %+v", probe)
	}
	if out, err := daemons[2].ctl(t, "cluster", "probe", "--proposers", "1000"); err == nil || !strings.Contains(out, "proposers 1000") {
		t.Fatalf("probe with too many proposers: %v\n%s", err, out)
	}

	// SIGTERM: the daemon leaves cleanly, exits 0, and the others see it
	// as left, not failed.
	if err := daemons[2].stop(); err != nil {
		t.Fatalf("SIGTERM stop of b3: %v", err)
	}
	testpoll.Until(t, 30*time.Second, "b3 shown as left", func() error {
		out, err := daemons[0].ctl(t, "machine", "ls", "--json")
		if err != nil {
			return err
		}
		var ms []machine
		json.Unmarshal([]byte(out), &ms)
		for _, m := range ms {
			if m.Name == "b3" && m.Liveness == "left" {
				return nil
			}
		}
		return fmt.Errorf("machine ls: %s", out)
	})

	// With no daemon the CLI says so in one line and fails.
	cmd := exec.Command(filepath.Join(bin, "droverctl"), "--socket", filepath.Join(t.TempDir(), "none.sock"), "machine", "ls")
	raw, err := cmd.CombinedOutput()
	if err == nil || strings.Count(strings.TrimSpace(string(raw)), "\n") != 0 || !strings.Contains(string(raw), "not running") {
		t.Fatalf("CLI without daemon: err %v, output %q", err, raw)
	}
}

type daemonProc struct {
	name   string
	socket string
	bin    string
	cmd    *exec.Cmd
	done   chan error
	log    string
}

func startDaemon(t *testing.T, bin, name string, addr netip.Addr, extra ...string) *daemonProc {
	t.Helper()
	dir := t.TempDir()
	d := &daemonProc{name: name, socket: filepath.Join(dir, "drover.sock"), bin: bin, log: filepath.Join(dir, "droverd.log"), done: make(chan error, 1)}
	logf, err := os.Create(d.log)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"--name", name, "--data-dir", filepath.Join(dir, "data"), "--socket", d.socket,
		"--bind", addr.String(), "--lab-timing", "--log-level", "debug", "--dns-addr", ""}, extra...)
	d.cmd = exec.Command(filepath.Join(bin, "droverd"), args...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
		if t.Failed() {
			b, _ := os.ReadFile(d.log)
			t.Logf("--- %s log ---\n%s", name, b)
		}
	})
	testpoll.Until(t, 20*time.Second, name+" socket", func() error {
		_, err := os.Stat(d.socket)
		return err
	})
	return d
}

func (d *daemonProc) ctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return d.ctlInput(t, "", args...)
}

// ctlInput runs droverctl with input on its standard input.
func (d *daemonProc) ctlInput(t *testing.T, input string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "droverctl"), append([]string{"--socket", d.socket}, args...)...)
	cmd.Stdin = strings.NewReader(input)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// stop sends SIGTERM and waits for a clean exit.
func (d *daemonProc) stop() error {
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case err := <-d.done:
		d.done <- err
		return err
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s did not exit within 30s of SIGTERM", d.name)
	}
}

// notifyListener plays systemd's side of sd_notify.
type notifyListener struct {
	path string
	mu   sync.Mutex
	msgs []string
}

func listenNotify(t *testing.T) *notifyListener {
	n := &notifyListener{path: filepath.Join(t.TempDir(), "notify.sock")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() { conn.Close(); <-done })
	return n
}

func (n *notifyListener) saw(prefix string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, m := range n.msgs {
		if strings.HasPrefix(m, prefix) {
			return nil
		}
	}
	return fmt.Errorf("no %q among %q", prefix, n.msgs)
}
