package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// standbyManifest: db on host %s with a standby on host %s, refreshed
// every 2 s; kv (policy auto) on host %s with a standby on host %s.
const standbyManifest = `namespace = "shop"

[services.db]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = "%s"

[[services.db.ports]]
port = 80
target = 8080

[[services.db.volumes]]
name = "data"
path = "/data"
quota = "256MiB"

[services.db.readiness]
http = "/healthz"
interval = "300ms"

[services.db.standby]
machine = "%s"
interval = "2s"
`

const autoManifest = `
[services.kv]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = "%s"

[[services.kv.ports]]
port = 80
target = 8080

[[services.kv.volumes]]
name = "kvdata"
path = "/data"
quota = "256MiB"

[services.kv.readiness]
http = "/healthz"
interval = "300ms"

[services.kv.standby]
machine = "%s"
interval = "2s"
failover = "auto"
after = "2s"
`

// timedWriter writes to a service every interval and keeps when each
// write was acknowledged.
type timedWriter struct {
	mu    sync.Mutex
	acked map[string]time.Time // key -> acknowledged at
	body  map[string]string
	stop  chan struct{}
	done  chan struct{}
}

func startTimedWriter(from *lab.Host, ip, tag string, every time.Duration) *timedWriter {
	w := &timedWriter{acked: map[string]time.Time{}, body: map[string]string{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			case <-time.After(every):
			}
			key, body := fmt.Sprintf("%s-%s-%06d", tag, from.Name, i), fmt.Sprintf("write %d of %s from %s", i, tag, from.Name)
			if _, err := from.Run(context.Background(), "curl", "-sf", "-m", "1", "-XPOST", "--data", body, "http://"+ip+":80/write?key="+key); err == nil {
				w.mu.Lock()
				w.acked[key], w.body[key] = time.Now(), body
				w.mu.Unlock()
			}
		}
	}()
	return w
}

// Stop ends the writer; it returns the acknowledged writes.
func (w *timedWriter) Stop() (map[string]time.Time, map[string]string) {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked, w.body
}

// TestLabStandby: a service with a standby on a 3-host lab. Its owner is
// killed whole (droverd, engine, container, link): a failover is refused
// while the owner's lease may still hold, then done by hand; the service
// answers from the standby at its service IP; every write acknowledged
// before the copy's snapshot is there by content, and each one missing was
// acknowledged after it (the reported loss window). The old owner comes
// back: it never starts the service, keeps its diverged copy aside and says
// how much it wrote, and becomes the standby by an increment. Then a second
// service with failover = "auto" has its owner cut off the network but
// left running with a client on that host writing: its copy stops before
// the failover, which happens by itself, and a watcher sampling every
// engine never sees it serving on two hosts.
func TestLabStandby(t *testing.T) {
	h, daemons := workloadLab(t, "ds")
	d3 := daemons[2]
	mf := writeManifest(t, "shop.toml", fmt.Sprintf(standbyManifest, h[0].Name, h[1].Name))
	testpoll.Until(t, 90*time.Second, "deploy", func() error {
		if out, err := d3.ctlWithin(60*time.Second, "deploy", "-f", mf); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ip := serviceNamed(t, d3, "shop", "db").ServiceIP
	// Bulk the clients never touch: a full copy sends all of it, an
	// increment only the clients' writes, whatever this machine's speed
	// (the clients' writes alone were as much as the whole volume).
	data := filepath.Join(h[0].PoolMount, "drover", "shop", "data")
	fillRandom(t, data, 16)
	var writers []*timedWriter
	for _, host := range h {
		writers = append(writers, startTimedWriter(host, ip, "db", 50*time.Millisecond))
	}
	testpoll.Until(t, 30*time.Second, "a standby copy on "+h[1].Name, func() error {
		if sb := serviceNamed(t, d3, "shop", "db").Standby; sb == nil || sb.Machine != h[1].Name || sb.Snapshot == "" {
			return fmt.Errorf("standby %+v", sb)
		}
		return nil
	})
	out, _ := d3.ctl("volume", "ls")
	if !strings.Contains(out, h[1].Name) {
		t.Fatalf("volume ls does not name the standby:\n%s", out)
	}
	t.Logf("volume ls:\n%s", out)
	time.Sleep(5 * time.Second)

	// The owner dies whole.
	l := h[0].Lab()
	if err := l.SetLinkUp(h[0], false); err != nil {
		t.Fatal(err)
	}
	if err := l.Kill(h[0]); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now() // no write is acknowledged after this until the failover
	writers[0].Stop()
	if out, err := d3.ctl("service", "failover", "shop/db"); err == nil || !(strings.Contains(out, "is alive") || strings.Contains(out, "lease")) {
		t.Fatalf("a failover right after the owner died: %v\n%s", err, out)
	} else {
		t.Logf("refused at first: %s", strings.TrimSpace(out))
	}
	var res ctlapi.FailoverResult
	testpoll.Until(t, 90*time.Second, "failover", func() error {
		out, err := d3.ctlWithin(3*time.Minute, "service", "failover", "shop/db", "--json")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return json.Unmarshal([]byte(out), &res)
	})
	t.Logf("failed over %s after the kill: from %s to %s, snapshot taken %s before the kill, loss window %s, ready after %s",
		res.FailedOverAt.Sub(killedAt).Round(time.Millisecond), res.From, res.To, killedAt.Sub(res.SnapshotTakenAt).Round(time.Millisecond),
		time.Duration(res.LossWindow).Round(time.Millisecond), time.Duration(res.Took).Round(time.Millisecond))
	if res.From != h[0].Name || res.To != h[1].Name || res.SnapshotTakenAt.After(killedAt) || res.LossWindow <= 0 {
		t.Fatalf("failover result %+v", res)
	}
	time.Sleep(2 * time.Second) // the writers on the living hosts reach the new owner
	acked, bodies := map[string]time.Time{}, map[string]string{}
	for _, w := range writers {
		a, b := w.Stop()
		for k, v := range a {
			acked[k], bodies[k] = v, b[k]
		}
	}
	dir := filepath.Join(h[1].PoolMount, "drover", "shop", "data")
	var lostAfter, kept, after int
	for key, at := range acked {
		b, err := os.ReadFile(filepath.Join(dir, key))
		switch {
		case err == nil && string(b) == bodies[key]:
			kept++
			if at.After(res.FailedOverAt) {
				after++
			}
		case at.Before(res.SnapshotTakenAt):
			t.Fatalf("write %s acknowledged at %s, before the snapshot of %s, is not on the new owner: %q %v",
				key, at.Format("15:04:05.000"), res.SnapshotTakenAt.Format("15:04:05.000"), b, err)
		case at.After(killedAt):
			t.Fatalf("write %s acknowledged at %s, after the owner died, is not on the new owner", key, at.Format("15:04:05.000"))
		default:
			lostAfter++
		}
	}
	if after == 0 {
		t.Fatal("no write reached the service after the failover")
	}
	t.Logf("%d acknowledged writes on the new owner (%d after the failover); %d acknowledged within the loss window are not, all after its snapshot", kept, after, lostAfter)

	// The old owner comes back.
	if err := l.SetLinkUp(h[0], true); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDocker(h[0]); err != nil {
		t.Fatal(err)
	}
	daemons[0].start(t)
	never := watchServing(h[0], "drover-shop-db")
	testpoll.Until(t, 90*time.Second, "the old owner settles and becomes the standby", func() error {
		db := serviceNamed(t, d3, "shop", "db")
		if !strings.Contains(db.LastFailover, "bytes after it") || db.Standby == nil || db.Standby.Machine != h[0].Name ||
			db.Standby.Snapshot == "" || !db.Standby.TakenAt.After(res.FailedOverAt) {
			return fmt.Errorf("db: %+v %+v", db.LastFailover, db.Standby)
		}
		return nil
	})
	if seen := never.Stop(); seen > 0 {
		t.Fatalf("the old owner ran db again (%d samples)", seen)
	}
	out, _ = d3.ctl("service", "ls")
	t.Logf("service ls:\n%s", out)
	testpoll.Until(t, 10*time.Second, "the new owner's standby metrics", func() error {
		scrape, err := h[1].Run(context.Background(), "curl", "-sf", "-m", "5", "http://127.0.0.1:9477/metrics")
		if err != nil || !strings.Contains(scrape, `drover_standby_lag_seconds{service="shop/db"}`) || !strings.Contains(scrape, `drover_standby_sent_bytes_total{service="shop/db"}`) {
			return fmt.Errorf("%v: no standby lag or bytes for shop/db", err)
		}
		return nil
	})

	// A planned move back to the standby sends only what changed since
	// its newest copy; clients on the three hosts lose nothing.
	var movers []*writer
	for _, host := range h {
		movers = append(movers, startWriter(host, ip, 100*time.Millisecond))
	}
	m, _, out, err := migrateJSON(d3, "migrate", "apply", "shop/db", "--to", h[0].Name)
	if err != nil || m.Phase != "done" {
		t.Fatalf("migrate to the standby: %v\n%s", err, out)
	}
	moved := map[string]string{}
	for _, w := range movers {
		for k, v := range w.Stop() {
			moved[k] = v
		}
	}
	requireAcked(t, filepath.Join(h[0].PoolMount, "drover", "shop", "data"), moved)
	if v := m.Volumes[0]; !strings.HasPrefix(v.Base, "drover-standby-") || v.BytesSent*4 > v.TotalBytes {
		t.Fatalf("the move to the standby: base %q, %d bytes sent of %d", v.Base, v.BytesSent, v.TotalBytes)
	} else {
		t.Logf("moved to the standby from %s: %d bytes sent of %d referenced; %d acknowledged writes from 3 hosts on %s", v.Base, v.BytesSent, v.TotalBytes, len(moved), h[0].Name)
	}
	if db := serviceNamed(t, d3, "shop", "db"); db.Standby == nil || db.Standby.Machine != h[1].Name {
		t.Fatalf("after the move the old owner is not the standby: %+v", db.Standby)
	}

	// Auto failover under a partition: kv on host 3, standby host 2, a
	// client on host 3 itself. Host 3 is cut off and left running.
	mf = writeManifest(t, "shop.toml", fmt.Sprintf(standbyManifest, h[0].Name, h[1].Name)+fmt.Sprintf(autoManifest, h[2].Name, h[1].Name))
	d2 := daemons[1]
	testpoll.Until(t, 90*time.Second, "deploy kv", func() error {
		if out, err := d2.ctlWithin(60*time.Second, "deploy", "-f", mf); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	kvIP := serviceNamed(t, d2, "shop", "kv").ServiceIP
	testpoll.Until(t, 30*time.Second, "kv's standby copy", func() error {
		if sb := serviceNamed(t, d2, "shop", "kv").Standby; sb == nil || sb.Snapshot == "" {
			return fmt.Errorf("standby %+v", sb)
		}
		return nil
	})
	local := startTimedWriter(h[2], kvIP, "kv", 50*time.Millisecond)
	twice := watchTwice(h)
	time.Sleep(time.Second)
	cutAt := time.Now()
	if err := l.SetLinkUp(h[2], false); err != nil {
		t.Fatal(err)
	}
	var stoppedAt time.Time
	testpoll.Until(t, 30*time.Second, "kv stops on the cut-off host", func() error {
		if serving(h[2], "drover-shop-kv") {
			return fmt.Errorf("still serving on %s", h[2].Name)
		}
		stoppedAt = time.Now()
		return nil
	})
	testpoll.Until(t, 90*time.Second, "kv failed over by itself", func() error {
		kv := serviceNamed(t, d2, "shop", "kv")
		if kv.Machine != h[1].Name || !kv.Ready {
			return fmt.Errorf("kv on %s, ready %v", kv.Machine, kv.Ready)
		}
		return nil
	})
	kv := serviceNamed(t, d2, "shop", "kv")
	local.Stop()
	seen, samples := twice.Stop()
	if len(seen) > 0 {
		t.Fatalf("served on two hosts: %v", seen)
	}
	failedAt := kv.LastFailoverAt
	if failedAt.IsZero() || !stoppedAt.Before(failedAt) {
		t.Fatalf("kv stopped on the cut-off host at %s, failed over at %s (%s)", stoppedAt.Format("15:04:05.000"), failedAt.Format(time.RFC3339), kv.LastFailover)
	}
	t.Logf("cut off at %s: kv stopped there after %s, failed over %s after the cut; %d samples of every engine, never on two hosts",
		cutAt.Format("15:04:05.000"), stoppedAt.Sub(cutAt).Round(100*time.Millisecond), failedAt.Sub(cutAt).Round(time.Second), samples)
	if err := l.SetLinkUp(h[2], true); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 90*time.Second, "the cut-off host settles", func() error {
		kv := serviceNamed(t, d2, "shop", "kv")
		if !strings.Contains(kv.LastFailover, "bytes after it") || kv.Standby == nil || kv.Standby.Machine != h[2].Name {
			return fmt.Errorf("kv: %s %+v", kv.LastFailover, kv.Standby)
		}
		return nil
	})
}

// servingWatch counts the samples in which a host serves a container.
type servingWatch struct {
	stop chan struct{}
	done chan struct{}
	seen int
}

func watchServing(host *lab.Host, name string) *servingWatch {
	w := &servingWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if serving(host, name) {
				w.seen++
			}
		}
	}()
	return w
}

// Stop ends the watch and returns how many samples saw it serving.
func (w *servingWatch) Stop() int {
	close(w.stop)
	<-w.done
	return w.seen
}
