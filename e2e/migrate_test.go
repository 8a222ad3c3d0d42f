package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// shopLab is three hosts with droverd, the test image and shop/web
// deployed on host 2 with two volumes: data (bulkMiB of random data in
// 64 MiB files, written straight into the dataset) and logs.
func shopLab(t *testing.T, prefix string, bulkMiB int, extra ...string) ([]*lab.Host, []*labDaemon, string) {
	t.Helper()
	h, daemons := workloadLab(t, prefix, extra...)
	d1 := daemons[0]
	mf := writeManifest(t, "shop.toml", shopTwoVolumes(h[1].Name))
	// wait until capacity is known so the target passes pre-flight
	testpoll.Until(t, 60*time.Second, "deploy", func() error {
		out, err := d1.ctl("deploy", "-f", mf)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ip := services(t, d1)[0].ServiceIP
	fillRandom(t, dataDir(h[1]), bulkMiB)
	return h, daemons, ip
}

// shopTwoVolumes is shop/web on machine with a 1 GiB data volume and a
// logs volume.
func shopTwoVolumes(machine string) string {
	return strings.Replace(fmt.Sprintf(shopManifest, "a", machine, "0s"), `"256MiB"`, `"1GiB"`, 1) + `
[[services.web.volumes]]
name = "logs"
path = "/logs"
quota = "64MiB"
`
}

func dataDir(h *lab.Host) string { return filepath.Join(h.PoolMount, "drover", "shop", "data") }

// writer is a client that writes to the service every interval, keeping
// the writes the service acknowledged.
type writer struct {
	mu     sync.Mutex
	acked  map[string]string
	failed int // writes that got no acknowledgement
	stop   chan struct{}
	done   chan struct{}
}

func startWriter(from *lab.Host, ip string, every time.Duration) *writer {
	w := &writer{acked: map[string]string{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			case <-time.After(every):
			}
			key, body := fmt.Sprintf("%s-w%06d", from.Name, i), fmt.Sprintf("write %d from %s", i, from.Name)
			if _, err := from.Run(context.Background(), "curl", "-sf", "-m", "2", "-XPOST", "--data", body, "http://"+ip+":80/write?key="+key); err == nil {
				w.mu.Lock()
				w.acked[key] = body
				w.mu.Unlock()
			} else {
				w.mu.Lock()
				w.failed++
				w.mu.Unlock()
			}
		}
	}()
	return w
}

// Stop ends the writer and returns what was acknowledged.
func (w *writer) Stop() map[string]string {
	close(w.stop)
	<-w.done
	return w.snapshot()
}

// Failed counts the writes that got no acknowledgement so far.
func (w *writer) Failed() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.failed
}

func (w *writer) snapshot() map[string]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]string, len(w.acked))
	for k, v := range w.acked {
		out[k] = v
	}
	return out
}

// requireAcked checks that every acknowledged write is in dir.
func requireAcked(t *testing.T, dir string, acked map[string]string) {
	t.Helper()
	for key, body := range acked {
		b, err := os.ReadFile(filepath.Join(dir, key))
		if err != nil || string(b) != body {
			t.Fatalf("acknowledged write %s is not in %s: %q %v", key, dir, b, err)
		}
	}
}

// migrateJSON runs a migration command with --json and returns its
// result and events.
func migrateJSON(d *labDaemon, args ...string) (ctlapi.MigrationInfo, []ctlapi.MigrationEvent, string, error) {
	out, err := d.ctlWithin(5*time.Minute, append(args, "--json")...)
	var info ctlapi.MigrationInfo
	var events []ctlapi.MigrationEvent
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var line ctlapi.MigrateStreamLine
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			continue
		}
		if line.Event != nil {
			events = append(events, *line.Event)
		}
		if line.Result != nil {
			info = *line.Result
		}
	}
	return info, events, out, err
}

// treeHash hashes the names and contents of the files under dir.
func treeHash(t *testing.T, dir string) string {
	t.Helper()
	var files []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	sort.Strings(files)
	h := sha256.New()
	for _, f := range files {
		rel, _ := filepath.Rel(dir, f)
		fmt.Fprintf(h, "%s\x00", rel)
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(h, fh)
		fh.Close()
	}
	return hex.EncodeToString(h.Sum(nil))
}

// snapshotHash hashes a dataset's content at a snapshot, through a clone.
func snapshotHash(t *testing.T, dataset, snap string) string {
	t.Helper()
	clone := strings.SplitN(dataset, "/", 2)[0] + "/verify"
	if out, err := exec.Command("zfs", "clone", dataset+"@"+snap, clone).CombinedOutput(); err != nil {
		t.Fatalf("zfs clone: %v: %s", err, out)
	}
	defer exec.Command("zfs", "destroy", clone).Run()
	mp, err := exec.Command("zfs", "get", "-H", "-o", "value", "mountpoint", clone).Output()
	if err != nil {
		t.Fatal(err)
	}
	return treeHash(t, strings.TrimSpace(string(mp)))
}

func migrationsOf(t *testing.T, d *labDaemon) []ctlapi.MigrationInfo {
	t.Helper()
	out, err := d.ctl("migrate", "ls", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ms []ctlapi.MigrationInfo
	if err := json.Unmarshal([]byte(out), &ms); err != nil {
		t.Fatal(err)
	}
	return ms
}

// TestLabMigrate moves a service with two volumes, 320 MiB on one, from
// host 2 to host 3 while a client keeps writing: every acknowledged write
// is on the target, the volume's content matches the source's, the source
// container goes and its copy stays, the service answers at its IP from
// every host. Then a rollback moves it back sending only the difference
// and keeping the writes made after the move; a rendered manifest moves it
// again through `deploy -f`; purge-source destroys the kept copy.
func TestLabMigrate(t *testing.T) {
	h, daemons, ip := shopLab(t, "dg", 320)
	d1 := daemons[0]
	ctx := context.Background()

	// Preview: every check passes, sizes are known, nothing moves.
	out, err := d1.ctl("migrate", "preview", "shop/web", "--to", h[2].Name, "--json")
	var plan ctlapi.MigrationPlan
	if err != nil || json.Unmarshal([]byte(out), &plan) != nil || !plan.OK || len(plan.Checks) < 8 || plan.Volumes[0].ReferencedBytes < 256<<20 || plan.Volumes[0].IncrementalBase != "" {
		t.Fatalf("preview: %v\n%s", err, out)
	}
	// A migration onto its own machine is refused before anything moves.
	if out, err := d1.ctl("migrate", "apply", "shop/web", "--to", h[1].Name); err == nil || !strings.Contains(out, "pre-flight failed") || !strings.Contains(out, "target differs from source") {
		t.Fatalf("migration onto its own machine: %v\n%s", err, out)
	}

	w := startWriter(h[0], ip, 50*time.Millisecond)
	time.Sleep(time.Second)
	m, events, out, err := migrateJSON(d1, "migrate", "apply", "shop/web", "--to", h[2].Name)
	time.Sleep(500 * time.Millisecond)
	acked := w.Stop()
	if err != nil {
		t.Fatalf("migrate apply: %v\n%s", err, out)
	}
	if m.Phase != "done" || m.Target != h[2].Name || m.Downtime <= 0 || len(m.Volumes) != 2 || m.Volumes[0].BytesSent < 256<<20 || m.Volumes[1].BytesSent == 0 {
		t.Fatalf("migration: %s", out)
	}
	phases, progress := map[string]bool{}, 0
	for _, ev := range events {
		if ev.Kind == "phase" {
			phases[ev.Phase] = true
		} else if ev.Bytes > 0 {
			progress++
		}
	}
	for _, p := range []string{"warm-copy", "source-stopped", "target-starting", "committed", "done"} {
		if !phases[p] {
			t.Fatalf("no %s event in:\n%s", p, out)
		}
	}
	// The downtime broken down: the copies went in place before the stop
	// (no adoption during it), the parts add up to no more than the whole,
	// and the final bytes are the volumes'.
	c := m.Cutover
	if c == nil {
		t.Fatalf("no cutover breakdown in:\n%s", out)
	}
	parts := c.Stop + c.FinalSnapshot + c.FinalSend + c.Start + c.Ready + c.Commit
	if c.Stop <= 0 || c.FinalSend <= 0 || c.Start <= 0 || c.Commit <= 0 || c.Prepared <= 0 || c.Adopt != 0 || parts > c.Total ||
		c.FinalBytes != m.Volumes[0].FinalBytes+m.Volumes[1].FinalBytes {
		t.Fatalf("cutover breakdown %+v of:\n%s", *c, out)
	}
	t.Logf("cutover: %s", c)
	if progress < 2 {
		t.Fatalf("no live progress in:\n%s", out)
	}
	final := m.Volumes[0].Snapshot
	t.Logf("256 MiB migration %s: downtime %s; data: %d bytes sent, %d in the final increment; logs: %d bytes, %d final",
		m.ID, time.Duration(m.Downtime), m.Volumes[0].BytesSent, m.Volumes[0].FinalBytes, m.Volumes[1].BytesSent, m.Volumes[1].FinalBytes)
	for _, v := range volumes(t, d1) {
		if v.Owner != h[2].Name {
			t.Fatalf("volume %s/%s still owned by %s", v.Namespace, v.Name, v.Owner)
		}
	}
	if ss := services(t, d1); ss[0].Machine != h[2].Name || ss[0].ServiceIP != ip {
		t.Fatalf("service after the move: %+v", ss)
	}
	if len(acked) < 10 {
		t.Fatalf("only %d writes acknowledged during the test", len(acked))
	}
	requireAcked(t, dataDir(h[2]), acked)
	// The content at the final snapshot is the source's, byte for byte.
	if got, want := snapshotHash(t, h[2].Pool+"/drover/shop/data", final), treeHash(t, dataDir(h[1])); got != want {
		t.Fatalf("content hash on the target %s, on the source %s", got, want)
	}
	// The same service IP answers from every host.
	for _, host := range h {
		// 64 MiB through userspace WireGuard: what is checked is that it
		// answers, whole, not how fast (this machine read 5-13 MiB/s).
		testpoll.Until(t, 2*time.Minute, "the service answering at its IP from "+host.Name, func() error {
			got, err := host.Run(ctx, "curl", "-sf", "-m", "60", "http://"+ip+":80/read?key=bulk3")
			if err != nil || len(got) != 64<<20 {
				return fmt.Errorf("read %d bytes: %v", len(got), err)
			}
			return nil
		})
	}
	testpoll.Until(t, 30*time.Second, "the source container removed", func() error {
		out, _ := exec.Command("docker", "-H", "unix://"+h[1].DockerSock, "ps", "-aq").Output()
		if strings.TrimSpace(string(out)) != "" {
			return fmt.Errorf("containers left on the source: %s", out)
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(dataDir(h[1]), "bulk0")); err != nil {
		t.Fatalf("the source's copy was not kept: %v", err)
	}
	if out, err := d1.ctl("migrate", "show", m.ID); err != nil || !strings.Contains(out, "source copy kept until") || !strings.Contains(out, "downtime") || !strings.Contains(out, "final send") {
		t.Fatalf("migrate show: %v\n%s", err, out)
	}

	// Rollback: writes made after the move stay, only the difference travels.
	w = startWriter(h[0], ip, 50*time.Millisecond)
	time.Sleep(2 * time.Second)
	back, _, out, err := migrateJSON(d1, "migrate", "rollback", m.ID)
	time.Sleep(500 * time.Millisecond)
	after := w.Stop()
	if err != nil || back.Phase != "done" || back.Target != h[1].Name || back.RollbackOf != m.ID {
		t.Fatalf("rollback: %v\n%s", err, out)
	}
	if back.Volumes[0].Base != final || back.Volumes[0].BytesSent >= 16<<20 {
		t.Fatalf("the rollback sent %d bytes of data from base %q; want only the difference from %s", back.Volumes[0].BytesSent, back.Volumes[0].Base, final)
	}
	t.Logf("rollback %s: %d bytes sent for a %d-byte volume, downtime %s", back.ID, back.Volumes[0].BytesSent, m.Volumes[0].BytesSent, time.Duration(back.Downtime))
	requireAcked(t, dataDir(h[1]), acked)
	requireAcked(t, dataDir(h[1]), after)
	if ss := services(t, d1); ss[0].Machine != h[1].Name {
		t.Fatalf("service after the rollback: %+v", ss)
	}

	// render-manifest prints what deploy -f needs to move it again.
	rendered, err := d1.ctl("migrate", "render-manifest", "shop/web", "--to", h[2].Name)
	if err != nil || !strings.Contains(rendered, `machine = "`+h[2].Name+`"`) || strings.Count(rendered, "move = true") != 2 {
		t.Fatalf("render-manifest: %v\n%s", err, rendered)
	}
	mf := writeManifest(t, "moved.toml", rendered)
	if out, err := d1.ctl("deploy", "preview", "-f", mf); err != nil || !strings.Contains(out, "migrate") {
		t.Fatalf("preview of the rendered manifest: %v\n%s", err, out)
	}
	out, err = d1.ctlWithin(5*time.Minute, "deploy", "-f", mf, "--json")
	var res ctlapi.DeployResult
	if err != nil || json.Unmarshal([]byte(out), &res) != nil || len(res.Migrations) != 1 || res.Migrations[0].Phase != "done" {
		t.Fatalf("deploy of the rendered manifest: %v\n%s", err, out)
	}
	moved := res.Migrations[0]
	if moved.Volumes[0].Base == "" {
		t.Fatalf("the move back did not use the copy kept on %s: %+v", h[2].Name, moved)
	}
	if ss := services(t, d1); ss[0].Machine != h[2].Name {
		t.Fatalf("service after the deploy-driven move: %+v", ss)
	}
	if out, err := d1.ctl("deploy", "preview", "-f", mf); err != nil || strings.Contains(out, "migrate") {
		t.Fatalf("the rendered manifest does not read as done after its move: %v\n%s", err, out)
	}

	// purge-source destroys the kept copy; no rollback after.
	if out, err := d1.ctl("migrate", "purge-source", moved.ID); err != nil {
		t.Fatalf("purge-source: %v\n%s", err, out)
	}
	if _, err := os.Stat(dataDir(h[1])); !os.IsNotExist(err) {
		t.Fatalf("the source copy is still there after purge-source: %v", err)
	}
	if out, err := d1.ctl("migrate", "rollback", moved.ID); err == nil || !strings.Contains(out, "purged") {
		t.Fatalf("rollback after purge: %v\n%s", err, out)
	}
}

// TestLabMigrateExecutorDies kills the daemon running a migration during
// its warm copy and does not bring it back: once its lease on the
// namespace lock runs out (15 s with --lab-timing), the
// leader aborts the migration, the target's copy is destroyed and the
// service goes on on its source.
func TestLabMigrateExecutorDies(t *testing.T) {
	h, daemons, ip := shopLab(t, "dk", 256)
	d1, d2 := daemons[0], daemons[1]
	done := make(chan struct{})
	go func() {
		defer close(done)
		d1.ctl("migrate", "apply", "shop/web", "--to", h[2].Name)
	}()
	testpoll.Until(t, 30*time.Second, "the migration in its warm copy", func() error {
		out, err := d2.ctl("migrate", "ls", "--json")
		if err != nil {
			return err
		}
		var ms []ctlapi.MigrationInfo
		json.Unmarshal([]byte(out), &ms)
		if len(ms) != 1 || ms[0].Phase != "warm-copy" {
			return fmt.Errorf("migrations: %s", out)
		}
		return nil
	})
	if err := d1.proc.Kill(); err != nil {
		t.Fatal(err)
	}
	<-done
	testpoll.Until(t, 90*time.Second, "the orphaned migration aborted by the others", func() error {
		out, err := d2.ctl("migrate", "ls", "--json")
		if err != nil {
			return err
		}
		var ms []ctlapi.MigrationInfo
		json.Unmarshal([]byte(out), &ms)
		if len(ms) != 1 || ms[0].Phase != "aborted" || !strings.Contains(ms[0].Error, "lease") {
			return fmt.Errorf("migrations: %s", out)
		}
		return nil
	})
	ss := services(t, d2)
	if ss[0].Machine != h[1].Name || !ss[0].Ready {
		t.Fatalf("service after the abort: %+v", ss)
	}
	testpoll.Until(t, 2*time.Minute, "the service answering from its source", func() error {
		got, err := h[2].Run(context.Background(), "curl", "-sf", "-m", "60", "http://"+ip+":80/read?key=bulk0")
		if err != nil || len(got) != 64<<20 {
			return fmt.Errorf("%d bytes, %v", len(got), err)
		}
		return nil
	})
	if out, _ := exec.Command("zfs", "list", "-H", "-o", "name", "-r", h[2].Pool).Output(); strings.Contains(string(out), "incoming/") {
		t.Fatalf("the target kept its partial copy:\n%s", out)
	}
}
