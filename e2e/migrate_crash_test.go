package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// arm makes the daemon on h kill itself with SIGKILL at point (see
// agent.CrashPointFileEnv); disarm undoes it.
func arm(t *testing.T, h *lab.Host, point string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(h.Dir, "crash-point"), []byte(point), 0o644); err != nil {
		t.Fatal(err)
	}
}

func disarm(h *lab.Host) { os.Remove(filepath.Join(h.Dir, "crash-point")) }

// runningContainers counts the running containers of shop/web on a host.
func runningContainers(h *lab.Host) (running, all int) {
	out, _ := exec.Command("docker", "-H", "unix://"+h.DockerSock, "ps", "-a", "--format", "{{.Names}} {{.State}}").Output()
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if strings.HasPrefix(line, "drover-shop-web ") {
			all++
			if strings.HasSuffix(line, " running") {
				running++
			}
		}
	}
	return running, all
}

func incoming(h *lab.Host) string {
	out, _ := exec.Command("zfs", "list", "-H", "-o", "name", "-r", h.Pool).Output()
	var in []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "drover-incoming/") {
			in = append(in, l)
		}
	}
	return strings.Join(in, " ")
}

// ctlJSON runs a droverctl command with --json and decodes its answer.
func ctlJSON(d *labDaemon, v any, args ...string) error {
	out, err := d.ctl(append(args, "--json")...)
	if err != nil {
		return err
	}
	return json.Unmarshal([]byte(out), v)
}

// settled checks, after a migration ended, what must hold whatever
// happened: one owner for both volumes and the service, the service
// running exactly once and there, every acknowledged write on the owner,
// no incoming copy left, the namespace lock free, the service answering.
func settled(t *testing.T, h []*lab.Host, d *labDaemon, ip string, acked map[string]string) int {
	t.Helper()
	owner := -1
	testpoll.Until(t, 90*time.Second, "one owner, the service running once there, no leftovers, lock free", func() error {
		var ss []ctlapi.Service
		var vs []ctlapi.Volume
		if err := ctlJSON(d, &ss, "service", "ls"); err != nil {
			return err
		}
		if err := ctlJSON(d, &vs, "volume", "ls"); err != nil {
			return err
		}
		owner = -1
		for i, host := range h {
			if ss[0].Machine == host.Name {
				owner = i
			}
		}
		if owner < 1 {
			return fmt.Errorf("service on %q", ss[0].Machine)
		}
		for _, v := range vs {
			if v.Owner != ss[0].Machine {
				return fmt.Errorf("volume %s owned by %s, service on %s", v.Name, v.Owner, ss[0].Machine)
			}
		}
		for i, host := range h {
			running, all := runningContainers(host)
			if i == owner && (running != 1 || all != 1) {
				return fmt.Errorf("%s (owner): %d running of %d containers", host.Name, running, all)
			}
			if i != owner && all != 0 {
				return fmt.Errorf("%s: %d containers of a service it does not own", host.Name, all)
			}
			if in := incoming(host); in != "" {
				return fmt.Errorf("%s keeps incoming copies: %s", host.Name, in)
			}
		}
		out, err := d.ctl("migrate", "preview", "shop/web", "--to", h[3-owner].Name, "--json")
		var plan ctlapi.MigrationPlan
		if err != nil || json.Unmarshal([]byte(out), &plan) != nil {
			return fmt.Errorf("preview: %v %s", err, out)
		}
		for _, c := range plan.Checks {
			if !c.OK { // the lock free, both machines back and answering
				return fmt.Errorf("pre-flight of the next move: %s: %s", c.Name, c.Detail)
			}
		}
		if _, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "2", "http://"+ip+":80/healthz"); err != nil {
			return fmt.Errorf("service not answering: %v", err)
		}
		return nil
	})
	requireAcked(t, dataDir(h[owner]), acked)
	return owner
}

// TestLabMigrateCrashMatrix kills with SIGKILL the source's daemon, the
// target's and the one running the migration, each at six points of a
// migration, and restarts it. Every run must end done (the commit
// happened) or aborted (it did not) with one owner per volume, the service
// running exactly once, no acknowledged write lost and the lock free,
// while a client writes all along.
func TestLabMigrateCrashMatrix(t *testing.T) {
	h, daemons, ip := shopLab(t, "dc", 64)
	executor := daemons[0]
	// Clients on the third host (the executor's) and on both hosts the
	// service moves between: a client on the target's own host must never
	// have a write acknowledged by a copy that an abort throws away.
	var writers []*writer
	for _, host := range h[:3] {
		writers = append(writers, startWriter(host, ip, 100*time.Millisecond))
	}
	snapshot := func() map[string]string {
		all := map[string]string{}
		for _, w := range writers {
			maps.Copy(all, w.snapshot())
		}
		return all
	}
	stopped := false
	defer func() {
		if !stopped {
			for _, w := range writers {
				w.Stop()
			}
		}
	}()
	owner := 1
	points := []string{"warm-copy", "source-stopped", "final-send", "target-started", "committed", "cleanup"}
	var report []string
	for _, role := range []string{"source", "target", "executor"} {
		for _, point := range points {
			src, dst := owner, 3-owner
			victim := map[string]int{"source": src, "target": dst, "executor": 0}[role]
			name := role + ":" + point
			began := time.Now()
			before := len(migrationsOf(t, executor))
			arm(t, h[victim], name)
			out, applyErr := executor.ctlWithin(3*time.Minute, "migrate", "apply", "shop/web", "--to", h[dst].Name)
			applied := time.Since(began)
			testpoll.Until(t, 60*time.Second, name+": the "+role+" daemon killed", func() error {
				if daemons[victim].proc.Exited() {
					return nil
				}
				return fmt.Errorf("%s still runs; apply said: %v %s", h[victim].Name, applyErr, out)
			})
			disarm(h[victim])
			daemons[victim].start(t)
			restarted := time.Since(began)
			var m ctlapi.MigrationInfo
			testpoll.Until(t, 90*time.Second, name+": the migration ended", func() error {
				out, err := executor.ctl("migrate", "ls", "--json")
				if err != nil {
					return err // the executor's daemon may still be starting
				}
				var ms []ctlapi.MigrationInfo
				if err := json.Unmarshal([]byte(out), &ms); err != nil {
					return err
				}
				if len(ms) != before+1 {
					return fmt.Errorf("%d migrations, want %d", len(ms), before+1)
				}
				m = ms[len(ms)-1]
				if m.Phase != "done" && m.Phase != "aborted" {
					return fmt.Errorf("migration %s is %s", m.ID, m.Phase)
				}
				return nil
			})
			committed := point == "committed" || point == "cleanup" || name == "source:target-started"
			if want := map[bool]string{true: "done", false: "aborted"}[committed]; m.Phase != want {
				t.Fatalf("%s: migration %s ended %s, want %s (error %q)", name, m.ID, m.Phase, want, m.Error)
			}
			ended := time.Since(began)
			owner = settled(t, h, executor, ip, snapshot())
			if want := map[bool]int{true: dst, false: src}[committed]; owner != want {
				t.Fatalf("%s: service on %s after a %s migration", name, h[owner].Name, m.Phase)
			}
			line := fmt.Sprintf("%-26s %-8s apply returned %5.1fs, restarted %5.1fs, ended %5.1fs, settled %5.1fs  %s", name, m.Phase,
				applied.Seconds(), restarted.Seconds(), ended.Seconds(), time.Since(began).Seconds(), m.Error)
			t.Log(line)
			report = append(report, line)
		}
	}
	acked := map[string]string{}
	for i, w := range writers {
		got := w.Stop()
		if len(got) == 0 {
			t.Fatalf("the client on %s had no write acknowledged", h[i].Name)
		}
		maps.Copy(acked, got)
	}
	stopped = true
	requireAcked(t, dataDir(h[owner]), acked)
	t.Logf("crash matrix, %d acknowledged writes from clients on 3 hosts, none lost:\n%s", len(acked), strings.Join(report, "\n"))
}

// webOn is the machine shop/web runs on.
func webOn(t *testing.T, d *labDaemon) string {
	t.Helper()
	for _, s := range services(t, d) {
		if s.Name == "web" {
			return s.Machine
		}
	}
	t.Fatal("no service shop/web")
	return ""
}

// TestLabMigrateRefusals: pre-flight failures (target pool too small,
// target down, namespace locked) stop a migration before any data moves
// and say why; a link cut between source and target during the warm copy
// aborts it and the service goes on on its source; the safety-window
// cleaner destroys a kept source copy once the window is over.
func TestLabMigrateRefusals(t *testing.T) {
	h, daemons, ip := shopLab(t, "rf", 256, "--safety-window", "20s")
	d1 := daemons[0]
	nothingMoved := func(what string) {
		t.Helper()
		if ms := migrationsOf(t, d1); len(ms) != 0 {
			t.Fatalf("%s: a migration was recorded: %+v", what, ms)
		}
		if in := incoming(h[2]); in != "" {
			t.Fatalf("%s: data moved: %s", what, in)
		}
		if on := webOn(t, d1); on != h[1].Name {
			t.Fatalf("%s: service moved to %s", what, on)
		}
	}
	apply := func(want ...string) {
		t.Helper()
		out, err := d1.ctlWithin(time.Minute, "migrate", "apply", "shop/web", "--to", h[2].Name)
		for _, w := range want {
			if err == nil || !strings.Contains(out, w) {
				t.Fatalf("apply: want a refusal naming %q, got %v:\n%s", w, err, out)
			}
		}
	}

	// The target's pool too small: a reservation eats its free space.
	avail, err := exec.Command("zfs", "get", "-Hp", "-o", "value", "available", h[2].Pool).Output()
	if err != nil {
		t.Fatal(err)
	}
	free, _ := strconv.ParseUint(strings.TrimSpace(string(avail)), 10, 64)
	if out, err := exec.Command("zfs", "create", "-o", "reservation="+strconv.FormatUint(free-(64<<20), 10), h[2].Pool+"/filler").CombinedOutput(); err != nil {
		t.Fatalf("filler: %v %s", err, out)
	}
	apply("pre-flight failed", "target pool space")
	nothingMoved("pool too small")
	testpoll.Until(t, 30*time.Second, "the filler gone", func() error {
		if out, err := exec.Command("zfs", "destroy", h[2].Pool+"/filler").CombinedOutput(); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})

	// The target down.
	daemons[2].proc.Kill()
	testpoll.Until(t, 30*time.Second, h[2].Name+" seen down", func() error {
		if m := byName(mustMachines(t, d1))[h[2].Name]; m.Liveness == "alive" {
			return fmt.Errorf("still %s", m.Liveness)
		}
		return nil
	})
	apply("pre-flight failed", "target online")
	nothingMoved("target down")
	daemons[2].start(t)
	testpoll.Until(t, 60*time.Second, h[2].Name+" back", func() error {
		if m := byName(mustMachines(t, d1))[h[2].Name]; m.Liveness != "alive" || m.RaftRole == "none" {
			return fmt.Errorf("%s, raft %s", m.Liveness, m.RaftRole)
		}
		return nil
	})

	// The namespace locked by a deploy that waits for a service that is
	// never ready.
	stuck := shopTwoVolumes(h[1].Name) + fmt.Sprintf(`
[services.stuck]
image = "drover-test:latest"
env = { PORT = "8081" }
machine = "%s"

[[services.stuck.ports]]
port = 81
target = 8081

[services.stuck.readiness]
http = "/never"
interval = "300ms"
retries = 20
`, h[0].Name)
	deployDone := make(chan struct{})
	go func() {
		defer close(deployDone)
		d1.ctlWithin(2*time.Minute, "deploy", "-f", writeManifest(t, "stuck.toml", stuck))
	}()
	testpoll.Until(t, 30*time.Second, "a migration refused on the lock", func() error {
		out, err := d1.ctl("migrate", "apply", "shop/web", "--to", h[2].Name)
		if err == nil || !strings.Contains(out, "namespace not locked") || !strings.Contains(out, h[0].Name+"/deploy/") {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	nothingMoved("namespace locked")
	<-deployDone

	// The link between source and target cut during the warm copy.
	done := make(chan error, 1)
	var out string
	go func() {
		var err error
		out, err = d1.ctlWithin(3*time.Minute, "migrate", "apply", "shop/web", "--to", h[2].Name)
		done <- err
	}()
	testpoll.Until(t, 60*time.Second, "the warm copy under way", func() error {
		select {
		case err := <-done:
			t.Fatalf("the migration ended before the link was cut: %v\n%s", err, out)
		default:
		}
		if incoming(h[2]) == "" {
			return fmt.Errorf("no incoming copy on %s yet", h[2].Name)
		}
		return nil
	})
	if err := h[0].Lab().SetLinkUp(h[2], false); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil || !strings.Contains(out, "aborted") {
		t.Fatalf("migration with the link cut: %v\n%s", err, out)
	}
	if ms := migrationsOf(t, d1); len(ms) != 1 || ms[0].Phase != "aborted" {
		t.Fatalf("migrations: %+v", ms)
	}
	t.Logf("link cut: %s", migrationsOf(t, d1)[0].Error)
	testpoll.Until(t, 30*time.Second, "the service answering from its source", func() error {
		if on := webOn(t, d1); on != h[1].Name {
			return fmt.Errorf("service on %s", on)
		}
		_, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "2", "http://"+ip+":80/healthz")
		return err
	})
	if err := h[0].Lab().SetLinkUp(h[2], true); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 90*time.Second, "the cut-off target's partial copy destroyed once it is back", func() error {
		if in := incoming(h[2]); in != "" {
			return fmt.Errorf("still there: %s", in)
		}
		return nil
	})

	// The safety window (20 s here): the source's copy goes by itself.
	testpoll.Until(t, 90*time.Second, h[2].Name+" seen alive again", func() error {
		if m := byName(mustMachines(t, d1))[h[2].Name]; m.Liveness != "alive" {
			return fmt.Errorf("%s", m.Liveness)
		}
		return nil
	})
	m, _, out, err := migrateJSON(d1, "migrate", "apply", "shop/web", "--to", h[2].Name)
	if err != nil || m.Phase != "done" {
		t.Fatalf("migration: %v\n%s", err, out)
	}
	testpoll.Until(t, 90*time.Second, "the kept copy purged after the window", func() error {
		out, err := d1.ctl("migrate", "show", m.ID, "--json")
		var got ctlapi.MigrationInfo
		if err != nil || json.Unmarshal([]byte(out), &got) != nil || got.SourcePurgedAt.IsZero() {
			return fmt.Errorf("not yet: %v %s", err, out)
		}
		if _, err := os.Stat(dataDir(h[1])); !os.IsNotExist(err) {
			return fmt.Errorf("marked purged but %s is there", dataDir(h[1]))
		}
		return nil
	})
}
