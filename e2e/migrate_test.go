package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// shopLab is three hosts with droverd, the test image and shop/web
// deployed on host 2 with two volumes, 72 MiB on the first.
func shopLab(t *testing.T, prefix string) ([]*lab.Host, []*labDaemon, string) {
	t.Helper()
	h, daemons := workloadLab(t, prefix)
	d1 := daemons[0]
	// Two volumes: both must move.
	mf := writeManifest(t, "shop.toml", fmt.Sprintf(shopManifest, "a", h[1].Name, "0s")+`
[[services.web.volumes]]
name = "logs"
path = "/logs"
quota = "64MiB"
`)
	// wait until capacity is known so the target passes pre-flight
	testpoll.Until(t, 60*time.Second, "deploy", func() error {
		out, err := d1.ctl("deploy", "-f", mf)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ip := services(t, d1)[0].ServiceIP
	blob := filepath.Join(t.TempDir(), "blob")
	if err := exec.Command("dd", "if=/dev/urandom", "of="+blob, "bs=1M", "count=24").Run(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := h[0].Run(context.Background(), "curl", "-sf", "-XPOST", "--data-binary", "@"+blob, fmt.Sprintf("http://%s:80/write?key=bulk%d", ip, i)); err != nil {
			t.Fatal(err)
		}
	}
	return h, daemons, ip
}

// TestLabMigrate moves a service with a volume that holds data, while a
// client keeps writing to it, from host 2 to host 3: every acknowledged
// write is on the target, the service answers at the same service IP,
// the source's container goes and its dataset stays.
func TestLabMigrate(t *testing.T) {
	h, daemons, ip := shopLab(t, "dg")
	d1 := daemons[0]
	ctx := context.Background()
	post := func(key, body string) error {
		_, err := h[0].Run(ctx, "curl", "-sf", "-m", "2", "-XPOST", "--data", body, "http://"+ip+":80/write?key="+key)
		return err
	}
	// Preview: every check passes, sizes are known, nothing moves.
	out, err := d1.ctl("migrate", "preview", "shop/web", "--to", h[2].Name, "--json")
	var plan ctlapi.MigrationPlan
	if err != nil || json.Unmarshal([]byte(out), &plan) != nil || !plan.OK || len(plan.Checks) < 8 || plan.Volumes[0].ReferencedBytes < 64<<20 {
		t.Fatalf("preview: %v\n%s", err, out)
	}
	if ss := services(t, d1); ss[0].Machine != h[1].Name {
		t.Fatalf("preview moved the service: %+v", ss)
	}
	// A migration that cannot work is refused before anything moves.
	if out, err := d1.ctl("migrate", "apply", "shop/web", "--to", h[1].Name); err == nil || !strings.Contains(out, "pre-flight failed") || !strings.Contains(out, "target differs from source") {
		t.Fatalf("migration onto its own machine: %v\n%s", err, out)
	}

	// A client keeps writing while the service moves; it keeps what was
	// acknowledged.
	var mu sync.Mutex
	acked := map[string]string{}
	stop := make(chan struct{})
	clientDone := make(chan struct{})
	go func() {
		defer close(clientDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			key, body := fmt.Sprintf("w%05d", i), fmt.Sprintf("write %d", i)
			if post(key, body) == nil {
				mu.Lock()
				acked[key] = body
				mu.Unlock()
			}
		}
	}()
	time.Sleep(time.Second)
	out, err = d1.ctl("migrate", "apply", "shop/web", "--to", h[2].Name, "--json")
	time.Sleep(time.Second)
	close(stop)
	<-clientDone
	if err != nil {
		t.Fatalf("migrate apply: %v\n%s", err, out)
	}
	var m ctlapi.MigrationInfo
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	if m.Phase != "done" || m.Target != h[2].Name || m.Downtime <= 0 || len(m.Volumes) != 2 || m.Volumes[0].BytesSent < 70<<20 || m.Volumes[1].BytesSent == 0 {
		t.Fatalf("migration: %s", out)
	}
	vols := volumes(t, d1)
	for _, v := range vols {
		if v.Owner != h[2].Name {
			t.Fatalf("volume %s/%s still owned by %s", v.Namespace, v.Name, v.Owner)
		}
	}
	if len(vols) != 2 {
		t.Fatalf("volumes: %+v", vols)
	}
	t.Logf("migration %s: downtime %s, %d bytes sent", m.ID, time.Duration(m.Downtime), m.Volumes[0].BytesSent)

	ss := services(t, d1)
	if ss[0].Machine != h[2].Name || ss[0].ServiceIP != ip {
		t.Fatalf("service after the move: %+v", ss)
	}
	// Every acknowledged write is on the target, read at the same service
	// IP from host 1 and from the target's dataset.
	mu.Lock()
	defer mu.Unlock()
	if len(acked) < 10 {
		t.Fatalf("only %d writes acknowledged during the test", len(acked))
	}
	dataset := filepath.Join(h[2].PoolMount, "drover", "shop", "data")
	for key, body := range acked {
		b, err := os.ReadFile(filepath.Join(dataset, key))
		if err != nil || string(b) != body {
			t.Fatalf("acknowledged write %s is not on the target: %q %v", key, b, err)
		}
	}
	testpoll.Until(t, 30*time.Second, "the service answering at its IP from the target", func() error {
		got, err := h[0].Run(ctx, "curl", "-sf", "-m", "2", "http://"+ip+":80/read?key=bulk2")
		if err != nil || len(got) != 24<<20 {
			return fmt.Errorf("read %d bytes: %v", len(got), err)
		}
		return nil
	})
	// The source's container goes; its dataset stays.
	testpoll.Until(t, 30*time.Second, "the source container removed", func() error {
		out, _ := exec.Command("docker", "-H", "unix://"+h[1].DockerSock, "ps", "-aq").Output()
		if strings.TrimSpace(string(out)) != "" {
			return fmt.Errorf("containers left on the source: %s", out)
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(h[1].PoolMount, "drover", "shop", "data", "bulk0")); err != nil {
		t.Fatalf("the source's copy was not kept: %v", err)
	}
}

// TestLabMigrateExecutorDies kills the daemon running a migration during
// its warm copy: once its lease on the namespace lock runs out, the
// leader aborts the migration, the target's copy is destroyed and the
// service goes on on its source.
func TestLabMigrateExecutorDies(t *testing.T) {
	h, daemons, ip := shopLab(t, "dk")
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
	testpoll.Until(t, 150*time.Second, "the orphaned migration aborted by the others", func() error {
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
	testpoll.Until(t, 30*time.Second, "the service answering from its source", func() error {
		got, err := h[2].Run(context.Background(), "curl", "-sf", "-m", "5", "http://"+ip+":80/read?key=bulk0")
		if err != nil || len(got) != 24<<20 {
			return fmt.Errorf("%d bytes, %v", len(got), err)
		}
		return nil
	})
	if out, _ := exec.Command("zfs", "list", "-H", "-o", "name", "-r", h[2].Pool).Output(); strings.Contains(string(out), "incoming/") {
		t.Fatalf("the target kept its partial copy:\n%s", out)
	}
}
