package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// drainManifest is three services on machine, each with its own volume.
func drainManifest(machine string) string {
	var b strings.Builder
	b.WriteString("namespace = \"shop\"\n")
	for i := 1; i <= 3; i++ {
		fmt.Fprintf(&b, `
[services.web%d]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = %q
[[services.web%d.ports]]
port = 80
target = 8080
[[services.web%d.volumes]]
name = "data%d"
path = "/data"
quota = "256MiB"
[services.web%d.readiness]
http = "/healthz"
interval = "300ms"
`, i, machine, i, i, i, i)
	}
	return b.String()
}

// pinnedManifest is a service with a bind mount of dir on machine.
func pinnedManifest(machine, dir string) string {
	return fmt.Sprintf(`namespace = "tools"

[services.pinned]
image = "drover-test:latest"
env = { PORT = "8080", DATA_DIR = "/srv" }
machine = %q
[[services.pinned.ports]]
port = 80
target = 8080
[[services.pinned.binds]]
host = %q
path = "/srv"
[services.pinned.readiness]
http = "/healthz"
interval = "300ms"
`, machine, dir)
}

// shutdownCommand is the drain command of systemd/drover-drain.service's
// ExecStop, with the lab's droverctl in place of the installed one.
func shutdownCommand(t *testing.T, bin string) []string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "systemd", "drover-drain.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if cmd, ok := strings.CutPrefix(line, "ExecStop="); ok {
			argv := strings.Fields(cmd)
			argv[0] = filepath.Join(bin, "droverctl")
			return argv
		}
	}
	t.Fatal("drover-drain.service has no ExecStop")
	return nil
}

// twiceWatch samples the running containers of every host and records any
// service seen running on two hosts at once.
type twiceWatch struct {
	stop, done chan struct{}
	mu         sync.Mutex
	seen       []string
	samples    int
}

// serving tells whether a container the engine lists as running has a
// process of the service in it, by what runs there: a move's target
// starts its container under drover-hold, which serves nothing and
// touches no volume until the cutover releases it (the container's
// configuration names drover-hold after the release too), and a source
// whose processes are gone is listed running until the engine has torn
// its network down.
func serving(host *lab.Host, name string) bool {
	out, err := exec.Command("docker", "-H", "unix://"+host.DockerSock, "top", name).Output()
	if err != nil {
		return false // stopped meanwhile
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return len(lines) > 1 && !strings.Contains(string(out), "/.drover/hold")
}

func watchTwice(h []*lab.Host) *twiceWatch {
	w := &twiceWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			where := map[string][]*lab.Host{}
			for _, host := range h {
				out, err := exec.Command("docker", "-H", "unix://"+host.DockerSock, "ps", "--filter", "status=running", "--format", "{{.Names}}").Output()
				if err != nil {
					continue // an engine busy or a host going down: next sample
				}
				for _, name := range strings.Fields(string(out)) {
					where[name] = append(where[name], host)
				}
			}
			// Listed running on several hosts: which of them serve?
			var twice []string
			for name, hosts := range where {
				if len(hosts) < 2 {
					continue
				}
				var on []string
				for _, host := range hosts {
					if serving(host, name) {
						on = append(on, host.Name)
					}
				}
				if len(on) > 1 {
					twice = append(twice, fmt.Sprintf("%s on %v", name, on))
				}
			}
			w.mu.Lock()
			w.samples++
			w.seen = append(w.seen, twice...)
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *twiceWatch) Stop() ([]string, int) {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.seen, w.samples
}

// TestLabDrain: host A runs three services with volumes, written to all
// along. The plan spreads them over B, C and D. The exact command of the
// shutdown unit, run on A, drains it; A's daemon (which runs the drain and
// is every migration's source) is killed midway and restarted: the drain
// resumes and ends drained, no service ever ran on two hosts, every
// acknowledged write is on its service's new machine. A deploy placed on
// A is refused while it drains. A service with a bind mount stays where
// it is and is reported. `machine rm` of the drained A removes it from the
// machines and the Raft configuration.
func TestLabDrain(t *testing.T) {
	h, daemons := workloadLabN(t, "dn", 4, "--allow-bind", os.TempDir())
	dA, dB := daemons[0], daemons[1]
	bin := binaries(t)
	mf := writeManifest(t, "shop.toml", drainManifest(h[0].Name))
	testpoll.Until(t, 60*time.Second, "deploy", func() error {
		if out, err := dA.ctl("deploy", "-f", mf); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	bindDir := t.TempDir()
	if out, err := dB.ctl("deploy", "-f", writeManifest(t, "tools.toml", pinnedManifest(h[3].Name, bindDir))); err != nil {
		t.Fatalf("deploy of the pinned service: %v\n%s", err, out)
	}
	// A bind from outside what the daemons allow is refused, naming the key.
	if out, err := dB.ctl("deploy", "-f", writeManifest(t, "etc.toml", pinnedManifest(h[3].Name, "/etc"))); err == nil ||
		!strings.Contains(out, `services.pinned.binds[0].host: "/etc" is under no host directory this daemon allows binds from`) {
		t.Fatalf("a bind of /etc: %v\n%s", err, out)
	}
	ips := map[string]string{}
	for _, s := range services(t, dA) {
		ips[s.Namespace+"/"+s.Name] = s.ServiceIP
	}
	// Different amounts of data, so the plan's order and spread are by size.
	for i, mib := range []int{40, 32, 24} {
		fillRandom(t, filepath.Join(h[0].PoolMount, "drover", "shop", fmt.Sprintf("data%d", i+1)), mib)
	}

	// The plan: one service on each other machine, nothing changed.
	var plan ctlapi.DrainInfo
	testpoll.Until(t, 30*time.Second, "a dry-run plan placing every service", func() error {
		if err := ctlJSON(dB, &plan, "machine", "drain", h[0].Name, "--dry-run"); err != nil {
			return err
		}
		targets := map[string]bool{}
		for _, it := range plan.Items {
			if it.State != "pending" || it.Target == "" || it.Target == h[0].Name {
				return fmt.Errorf("item %+v", it)
			}
			targets[it.Target] = true
		}
		if plan.State != "planned" || len(plan.Items) != 3 || len(targets) != 3 {
			return fmt.Errorf("plan %+v", plan)
		}
		return nil
	})
	if ms := byName(mustMachines(t, dB)); ms[h[0].Name].State != "active" {
		t.Fatalf("a dry run changed %s to %s", h[0].Name, ms[h[0].Name].State)
	}

	writers := map[string]*writer{}
	for svc, ip := range ips {
		if strings.HasPrefix(svc, "shop/") {
			writers[svc] = startWriter(h[1], ip, 100*time.Millisecond)
		}
	}
	twice := watchTwice(h)

	// The shutdown unit's command, on A. After the first service moved, A's
	// daemon kills itself as its next migration starts copying.
	argv := shutdownCommand(t, bin)
	t.Logf("shutdown unit command: %s", strings.Join(argv, " "))
	unit := exec.Command(argv[0], argv[1:]...)
	unit.Env = append(os.Environ(), "DROVER_SOCKET="+dA.socket())
	var unitOut strings.Builder
	unit.Stdout, unit.Stderr = &unitOut, &unitOut
	if err := unit.Start(); err != nil {
		t.Fatal(err)
	}
	unitDone := make(chan error, 1)
	go func() { unitDone <- unit.Wait() }()

	testpoll.Until(t, 30*time.Second, h[0].Name+" draining", func() error {
		if st := byName(mustMachines(t, dB))[h[0].Name].State; st != "draining" {
			return fmt.Errorf("%s is %s", h[0].Name, st)
		}
		return nil
	})
	extra := strings.Replace(strings.Replace(shopManifest, `namespace = "shop"`, `namespace = "extra"`, 1), `name = "data"`, `name = "more"`, 1)
	out, err := dB.ctl("deploy", "-f", writeManifest(t, "extra.toml", fmt.Sprintf(extra, "a", h[0].Name, "0s")))
	if err == nil || !strings.Contains(out, h[0].Name+" is draining") {
		t.Fatalf("a deploy placed on the draining %s: %v\n%s", h[0].Name, err, out)
	}

	testpoll.Until(t, 2*time.Minute, "the first service moved", func() error {
		var ms []ctlapi.Machine
		if err := ctlJSON(dB, &ms, "machine", "ls"); err != nil {
			return err
		}
		if dr := byName(ms)[h[0].Name].Drain; dr == nil || dr.Moved < 1 {
			return fmt.Errorf("drain %+v", dr)
		}
		return nil
	})
	arm(t, h[0], "executor:warm-copy")
	testpoll.Until(t, 2*time.Minute, h[0].Name+"'s daemon killed midway", func() error {
		if dA.proc.Exited() {
			return nil
		}
		return fmt.Errorf("still running")
	})
	disarm(h[0])
	dA.start(t)

	var drained ctlapi.Machine
	testpoll.Until(t, 4*time.Minute, h[0].Name+" drained after the restart", func() error {
		ms, err := dB.machines()
		if err != nil {
			return err
		}
		drained = byName(ms)[h[0].Name]
		if drained.State != "drained" || drained.Drain == nil || drained.Drain.State != "drained" {
			return fmt.Errorf("%s is %s, drain %+v", h[0].Name, drained.State, drained.Drain)
		}
		return nil
	})
	// The unit's command rode out its daemon's death and saw the drain end.
	select {
	case err := <-unitDone:
		if err != nil || !strings.Contains(unitOut.String(), "lost droverd") || !strings.Contains(unitOut.String(), "drained") {
			t.Fatalf("the shutdown unit's command: %v\n%s", err, unitOut.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the shutdown unit's command did not end with the drain:\n%s", unitOut.String())
	}
	t.Logf("the shutdown unit's command:\n%s", unitOut.String())
	seen, samples := twice.Stop()
	if len(seen) > 0 {
		t.Fatalf("services ran on two hosts at once (%d samples): %v", samples, seen)
	}
	if samples < 20 {
		t.Fatalf("only %d samples of the running containers", samples)
	}
	var retried int
	for _, it := range drained.Drain.Items {
		if it.State != "moved" || it.Target == h[0].Name {
			t.Fatalf("drain item %+v", it)
		}
	}
	for _, m := range migrationsOf(t, dB) {
		if m.Phase == "aborted" {
			retried++
		}
	}
	if retried == 0 {
		t.Fatal("no migration was cut short by the kill: the test did not test a resume")
	}
	owner := map[string]string{}
	for _, s := range services(t, dB) {
		owner[s.Namespace+"/"+s.Name] = s.Machine
		if s.Machine == h[0].Name {
			t.Fatalf("%s/%s still on %s", s.Namespace, s.Name, h[0].Name)
		}
	}
	total := 0
	for svc, w := range writers {
		acked := w.Stop()
		total += len(acked)
		i := strings.TrimPrefix(svc, "shop/web")
		host := h[slices.IndexFunc(h, func(x *lab.Host) bool { return x.Name == owner[svc] })]
		requireAcked(t, filepath.Join(host.PoolMount, "drover", "shop", "data"+i), acked)
		if _, err := h[1].Run(context.Background(), "curl", "-sf", "-m", "2", "http://"+ips[svc]+":80/healthz"); err != nil {
			t.Fatalf("%s does not answer at %s on %s: %v", svc, ips[svc], owner[svc], err)
		}
	}
	t.Logf("drain of %s: %v; %d acknowledged writes, none lost; %d migrations aborted by the kill and retried; %d samples, never twice",
		h[0].Name, drained.Drain.Items, total, retried, samples)

	// The bind-mounted service stays and is reported; the rest of D moves.
	out, err = dB.ctlWithin(5*time.Minute, "machine", "drain", h[3].Name, "--wait")
	if err == nil || !strings.Contains(out, "tools/pinned") || !strings.Contains(out, "stays") || !strings.Contains(out, bindDir) {
		t.Fatalf("drain of %s with a bind-mounted service: %v\n%s", h[3].Name, err, out)
	}
	t.Logf("drain of %s:\n%s", h[3].Name, out)
	for _, s := range services(t, dB) {
		if s.Name == "pinned" && s.Machine != h[3].Name || s.Name != "pinned" && s.Machine == h[3].Name {
			t.Fatalf("after the drain of %s: %s/%s on %s", h[3].Name, s.Namespace, s.Name, s.Machine)
		}
	}
	if out, err := exec.Command("docker", "-H", "unix://"+h[3].DockerSock, "ps", "--format", "{{.Names}}").Output(); err != nil || strings.TrimSpace(string(out)) != "drover-tools-pinned" {
		t.Fatalf("%s runs %q, want the pinned service only (%v)", h[3].Name, out, err)
	}
	if out, err := dB.ctl("machine", "activate", h[3].Name); err != nil {
		t.Fatalf("activate: %v\n%s", err, out)
	}

	// A drained, alive machine is removed: it leaves, its Raft seat goes.
	out, err = dB.ctl("machine", "rm", h[0].Name)
	if err != nil {
		t.Fatalf("machine rm: %v\n%s", err, out)
	}
	testpoll.Until(t, 30*time.Second, h[0].Name+" gone from machine ls and Raft", func() error {
		if _, ok := byName(mustMachines(t, dB))[h[0].Name]; ok {
			return fmt.Errorf("still listed")
		}
		st, err := dB.status()
		if err != nil {
			return err
		}
		for _, s := range append(st.Voters, st.NonVoters...) {
			if s.Name == h[0].Name || s.ID == drained.ID {
				return fmt.Errorf("still in raft: %+v", s)
			}
		}
		return nil
	})
	testpoll.Until(t, 30*time.Second, "the removed machine in no cluster", func() error {
		if st, err := dA.status(); err != nil || st.Initialized {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
	// A machine that holds volumes is refused, and --force says what is lost.
	out, err = dB.ctl("machine", "rm", h[3].Name)
	if err == nil || !strings.Contains(out, "still holds") && !strings.Contains(out, "drain it first") {
		t.Fatalf("rm of an active machine with a service: %v\n%s", err, out)
	}
}
