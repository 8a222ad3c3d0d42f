package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// labDaemon is droverd running on a lab host.
type labDaemon struct {
	host *lab.Host
	bin  string
	proc *lab.Proc
	args []string
	env  []string // extra environment, as NAME=value
}

func (d *labDaemon) socket() string { return filepath.Join(d.host.RunDir, "drover.sock") }

func startLabDaemon(t testing.TB, bin string, h *lab.Host, extra ...string) *labDaemon {
	t.Helper()
	// Every lab daemon can be armed with a crash point by writing it to
	// this file (see agent.CrashPointFileEnv); absent, nothing happens.
	d := &labDaemon{host: h, bin: bin, env: []string{"DROVER_CRASH_POINT_FILE=" + filepath.Join(h.Dir, "crash-point")}}
	if slices.Contains(extra, "--lab-timing=false") {
		d.env = nil // production-timed daemons (the benchmarks) run without test hooks
	}
	d.args = append([]string{filepath.Join(bin, "droverd"),
		"--name", h.Name, "--bind", h.UnderlayIP,
		"--data-dir", filepath.Join(h.Dir, "drover"), "--socket", d.socket(),
		"--wg-interface", h.Name + "wg", "--lab-timing", "--log-level", "debug"}, extra...)
	d.start(t)
	return d
}

func (d *labDaemon) start(t testing.TB) {
	t.Helper()
	argv := d.args
	if len(d.env) > 0 {
		argv = append(append([]string{"env"}, d.env...), d.args...)
	}
	p, err := d.host.Start("droverd", argv...)
	if err != nil {
		t.Fatal(err)
	}
	d.proc = p
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(p.LogPath())
			// The tail above debug level: WireGuard's debug lines would
			// push out what matters.
			var lines []string
			for _, l := range strings.Split(string(b), "\n") {
				if !strings.Contains(l, "level=DEBUG") {
					lines = append(lines, l)
				}
			}
			if len(lines) > 60 {
				lines = lines[len(lines)-60:]
			}
			t.Logf("--- %s droverd log (tail) ---\n%s", d.host.Name, strings.Join(lines, "\n"))
		}
	})
	testpoll.Until(t, 20*time.Second, d.host.Name+" control socket", func() error {
		if p.Exited() {
			return fmt.Errorf("droverd exited: %v", p.Wait())
		}
		_, err := os.Stat(d.socket())
		return err
	})
}

func (d *labDaemon) ctl(args ...string) (string, error) { return d.ctlWithin(30*time.Second, args...) }

func (d *labDaemon) ctlWithin(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "droverctl"), append([]string{"--socket", d.socket()}, args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String() + stderr.String(), fmt.Errorf("droverctl %s on %s: %w: %s", strings.Join(args, " "), d.host.Name, err, stderr.String())
	}
	return stdout.String(), nil
}

// ctlWarnings runs droverctl and returns what it printed on stderr (its
// warnings) with its error.
func (d *labDaemon) ctlWarnings(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "droverctl"), append([]string{"--socket", d.socket()}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	return stderr.String(), err
}

func (d *labDaemon) machines() ([]ctlapi.Machine, error) {
	out, err := d.ctl("machine", "ls", "--json")
	if err != nil {
		return nil, err
	}
	var ms []ctlapi.Machine
	return ms, json.Unmarshal([]byte(out), &ms)
}

func (d *labDaemon) status() (ctlapi.ClusterStatus, error) {
	out, err := d.ctl("cluster", "status", "--json")
	if err != nil {
		return ctlapi.ClusterStatus{}, err
	}
	var st ctlapi.ClusterStatus
	return st, json.Unmarshal([]byte(out), &st)
}

func byName(ms []ctlapi.Machine) map[string]ctlapi.Machine {
	out := map[string]ctlapi.Machine{}
	for _, m := range ms {
		out[m.Name] = m
	}
	return out
}

// rssKiB reads a process's resident memory.
func rssKiB(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

func requireLab(t testing.TB) {
	if os.Getenv("DROVER_E2E") == "" {
		t.Skip("lab tests run with DROVER_E2E=1 (make e2e)")
	}
}

// TestLabMesh: three hosts with real WireGuard, gossip and Raft form one
// cluster from one join address; Raft listens on the overlay only; a host
// cut off is seen failed and comes back by itself; a restarted daemon
// keeps its key and overlay address; a host with another key never joins.
func TestLabMesh(t *testing.T) {
	requireLab(t)
	bin := binaries(t)
	began := time.Now()
	l := lab.New(t, lab.Options{Hosts: 4, Prefix: "dm", Docker: true, ZFS: true})
	labUp := time.Since(began)
	h := l.Hosts

	d1 := startLabDaemon(t, bin, h[0], "--init")
	keyFile := filepath.Join(h[0].Dir, "drover", "cluster.key")
	tokenFile := joinTokenFile(t, d1)
	daemons := []*labDaemon{d1}
	for _, host := range h[1:3] {
		daemons = append(daemons, startLabDaemon(t, bin, host, "--join-token-file", tokenFile))
	}

	// One cluster, every machine with an overlay address, every pair
	// handshaken, one leader.
	testpoll.Until(t, 90*time.Second, "3 machines with overlay addresses and handshakes everywhere", func() error {
		for _, d := range daemons {
			ms, err := d.machines()
			if err != nil {
				return err
			}
			leaders := 0
			for _, m := range ms {
				if m.RaftRole == "leader" {
					leaders++
				}
				// Three machines are all Raft servers, each running Raft.
				if m.OverlayIP == "" || m.Liveness != "alive" || m.RaftRole == "none" || m.RaftRole == "observer" {
					return fmt.Errorf("%s sees %s: %+v", d.host.Name, m.Name, m)
				}
				if m.Name != d.host.Name && m.LastHandshake == nil {
					return fmt.Errorf("%s has no handshake with %s", d.host.Name, m.Name)
				}
			}
			if len(ms) != 3 || leaders != 1 {
				return fmt.Errorf("%s sees %d machines and %d leaders", d.host.Name, len(ms), leaders)
			}
		}
		return nil
	})
	formed := time.Since(began)
	for _, d := range daemons {
		t.Logf("%s: droverd RSS %d KiB", d.host.Name, rssKiB(d.proc.PID()))
	}
	t.Logf("lab of 4 hosts (Docker, ZFS) up in %v; 3-machine cluster formed %v after start", labUp.Round(time.Millisecond), formed.Round(time.Millisecond))

	// mesh status lists both peers with a handshake, traffic and allowed IPs.
	testpoll.Until(t, 30*time.Second, "mesh status complete on every host", func() error {
		for _, d := range daemons {
			out, err := d.ctl("mesh", "status", "--json")
			if err != nil {
				return err
			}
			var ms ctlapi.MeshStatus
			if err := json.Unmarshal([]byte(out), &ms); err != nil {
				return err
			}
			if len(ms.Peers) != 2 || ms.Address == "" {
				return fmt.Errorf("%s mesh status: %s", d.host.Name, out)
			}
			for _, p := range ms.Peers {
				if p.LastHandshake == nil || p.RxBytes == 0 || len(p.AllowedIPs) != 1 || p.Endpoint == "" {
					return fmt.Errorf("%s peer %+v", d.host.Name, p)
				}
			}
		}
		return nil
	})

	// Raft and RPC listen on the overlay address only, bound to the
	// WireGuard device.
	overlays := map[string]string{}
	ms, _ := d1.machines()
	for _, m := range ms {
		overlays[m.Name] = m.OverlayIP
	}
	for _, d := range daemons {
		out, err := d.host.Run(context.Background(), "ss", "-Hltn")
		if err != nil {
			t.Fatal(err)
		}
		for _, port := range []string{":7947", ":7948"} {
			found := false
			for _, line := range strings.Split(out, "\n") {
				f := strings.Fields(line)
				if len(f) < 4 || !strings.HasSuffix(f[3], port) {
					continue
				}
				// On the overlay address, bound to the WireGuard device.
				if want := overlays[d.host.Name] + "%" + d.host.Name + "wg" + port; f[3] != want {
					t.Fatalf("%s listens on %s, not on its overlay address bound to its WireGuard device (%s)", d.host.Name, f[3], want)
				}
				found = true
			}
			if !found {
				t.Fatalf("%s: nothing listens on %s:\n%s", d.host.Name, port, out)
			}
		}
	}

	// Only peers of the mesh reach Raft and RPC: a process on a member
	// itself, holding the cluster key, and an underlay neighbour that
	// routes the overlay range to the member are both refused, and the
	// member's log says so for the local one.
	target := overlays[h[0].Name]
	if raftErr, rpcErr := attackOverlay(t, h[0], target, keyFile); raftErr == nil || rpcErr == nil {
		t.Fatalf("a process on %s itself reached Raft (%v) or RPC (%v) on its overlay address", h[0].Name, raftErr, rpcErr)
	} else {
		t.Logf("from %s itself: raft %v; rpc %v", h[0].Name, raftErr, rpcErr)
	}
	testpoll.Until(t, 10*time.Second, "the refusal in the member's log", func() error {
		b, _ := os.ReadFile(d1.proc.LogPath())
		if !strings.Contains(string(b), "refused a connection from this host to the Raft port") {
			return fmt.Errorf("no refusal logged")
		}
		return nil
	})
	if _, err := h[3].Run(context.Background(), "ip", "route", "add", target+"/32", "via", h[0].UnderlayIP); err != nil {
		t.Fatal(err)
	}
	if raftErr, rpcErr := attackOverlay(t, h[3], target, keyFile); raftErr == nil || rpcErr == nil {
		t.Fatalf("an underlay neighbour reached Raft (%v) or RPC (%v) on %s's overlay address", raftErr, rpcErr, h[0].Name)
	} else {
		t.Logf("from underlay neighbour %s: raft %v; rpc %v", h[3].Name, raftErr, rpcErr)
	}
	h[3].Run(context.Background(), "ip", "route", "del", target+"/32")
	if st, err := d1.status(); err != nil || st.Term > 1<<30 {
		t.Fatalf("the attack moved the term: %+v %v", st, err)
	}

	// A host with another cluster key never appears, and its log says why.
	wrongKey := make([]byte, 32)
	rand.Read(wrongKey)
	wrongKeyFile := filepath.Join(h[3].Dir, "wrong.key")
	os.WriteFile(wrongKeyFile, []byte(base64.StdEncoding.EncodeToString(wrongKey)), 0o600)
	intruder := startLabDaemon(t, bin, h[3], "--join", h[0].UnderlayIP, "--cluster-key-file", wrongKeyFile)
	testpoll.Until(t, 30*time.Second, "the intruder's log to name the key", func() error {
		b, _ := os.ReadFile(intruder.proc.LogPath())
		if !strings.Contains(string(b), "cluster key") {
			return fmt.Errorf("log so far:\n%s", b)
		}
		return nil
	})
	time.Sleep(3 * time.Second)
	for _, d := range daemons {
		ms, err := d.machines()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := byName(ms)[h[3].Name]; ok || len(ms) != 3 {
			t.Fatalf("%s lists the host with the wrong key: %+v", d.host.Name, ms)
		}
	}
	intruder.proc.Stop(10 * time.Second)

	// Cut the leader off: the others see it failed and elect a leader that
	// serves commands; linked back, it rejoins by itself.
	var st ctlapi.ClusterStatus
	testpoll.Until(t, 30*time.Second, "three voters", func() error {
		var err error
		if st, err = d1.status(); err == nil && len(st.Voters) != 3 {
			err = fmt.Errorf("voters %+v", st.Voters)
		}
		return err
	})
	var cut *labDaemon
	var rest []*labDaemon
	for _, d := range daemons {
		if d.host.Name == st.LeaderName {
			cut = d
		} else {
			rest = append(rest, d)
		}
	}
	if cut == nil {
		t.Fatalf("leader %q is not a lab host", st.LeaderName)
	}
	if err := l.SetLinkUp(cut.host, false); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 60*time.Second, "cut-off leader seen failed and a new leader", func() error {
		for _, d := range rest {
			ms, err := d.machines()
			if err != nil {
				return err
			}
			if m := byName(ms)[cut.host.Name]; m.Liveness != "failed" && m.Liveness != "suspect" {
				return fmt.Errorf("%s sees %s as %s", d.host.Name, cut.host.Name, m.Liveness)
			}
			st, err := d.status()
			if err != nil {
				return err
			}
			if st.LeaderName == "" || st.LeaderName == cut.host.Name {
				return fmt.Errorf("%s sees leader %q", d.host.Name, st.LeaderName)
			}
		}
		return nil
	})
	testpoll.Until(t, 30*time.Second, "the cut-off host shown failed", func() error {
		ms, err := rest[0].machines()
		if err != nil {
			return err
		}
		if m := byName(ms)[cut.host.Name]; m.Liveness != "failed" {
			return fmt.Errorf("liveness %s", m.Liveness)
		}
		return nil
	})
	// The cut-off host says that what it shows may be stale, and since
	// when; the others say nothing of the kind.
	testpoll.Until(t, 30*time.Second, "the cut-off host warning that its view may be stale", func() error {
		for _, what := range []string{"service", "volume", "machine"} {
			warn, err := cut.ctlWarnings(what, "ls")
			if err != nil {
				return err
			}
			if !strings.Contains(warn, "may be stale") || !strings.Contains(warn, "ago") {
				return fmt.Errorf("%s ls on %s warned %q", what, cut.host.Name, warn)
			}
		}
		return nil
	})
	if warn, err := rest[0].ctlWarnings("service", "ls"); err != nil || warn != "" {
		t.Fatalf("service ls on %s, connected: %v, warned %q", rest[0].host.Name, err, warn)
	}
	if out, err := rest[0].ctl("machine", "activate", rest[1].host.Name); err != nil || !strings.Contains(out, "active") {
		t.Fatalf("a command after failover: %v %s", err, out)
	}
	if err := l.SetLinkUp(cut.host, true); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 90*time.Second, "the cut-off host back, alive, following the new leader", func() error {
		for _, d := range daemons {
			ms, err := d.machines()
			if err != nil {
				return err
			}
			for _, m := range ms {
				if m.Liveness != "alive" {
					return fmt.Errorf("%s sees %s as %s", d.host.Name, m.Name, m.Liveness)
				}
			}
		}
		st, err := cut.status()
		if err != nil {
			return err
		}
		if st.LeaderName == "" || st.LeaderName == cut.host.Name && st.Role != "leader" {
			return fmt.Errorf("returned host sees leader %q", st.LeaderName)
		}
		return nil
	})

	// A restarted daemon keeps its WireGuard key and overlay address.
	victim := daemons[1]
	before := byName(mustMachines(t, d1))[victim.host.Name]
	if err := victim.proc.Stop(20 * time.Second); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	victim.start(t)
	testpoll.Until(t, 60*time.Second, "restarted host back with the same identity", func() error {
		ms, err := victim.machines()
		if err != nil {
			return err
		}
		after := byName(ms)[victim.host.Name]
		if after.Liveness != "alive" || after.RaftRole == "none" {
			return fmt.Errorf("after restart: %+v", after)
		}
		if after.WGPublicKey != before.WGPublicKey || after.OverlayIP != before.OverlayIP {
			return fmt.Errorf("identity changed: key %s -> %s, overlay %s -> %s", before.WGPublicKey, after.WGPublicKey, before.OverlayIP, after.OverlayIP)
		}
		if m := byName(mustMachines(t, d1))[victim.host.Name]; m.LastHandshake == nil || time.Since(*m.LastHandshake) > time.Minute {
			return fmt.Errorf("no fresh handshake with the restarted host: %+v", m.LastHandshake)
		}
		return nil
	})
}

// joinTokenFile writes a join token of d's cluster (valid for an hour,
// any number of machines) to a file for --join-token-file, once d leads.
func joinTokenFile(t testing.TB, d *labDaemon, flags ...string) string {
	t.Helper()
	var tok string
	testpoll.Until(t, 30*time.Second, "a join token from "+d.host.Name, func() error {
		out, err := d.ctl(append([]string{"cluster", "join-token"}, flags...)...)
		tok = strings.TrimSpace(out)
		return err
	})
	file := filepath.Join(t.TempDir(), "join-token")
	if err := os.WriteFile(file, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

func mustMachines(t *testing.T, d *labDaemon) []ctlapi.Machine {
	t.Helper()
	ms, err := d.machines()
	if err != nil {
		t.Fatal(err)
	}
	return ms
}
