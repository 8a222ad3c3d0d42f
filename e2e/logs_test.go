package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
)

// TestLabServiceLogs: `droverctl service logs -f` on a third host follows
// a service across a move. The service logs every write before it
// acknowledges it; clients on the three hosts write throughout; every
// acknowledged write is in the followed log exactly once — nothing lost,
// nothing twice at the switch — and the log names both machines. Then
// `service restart` restarts the container where it runs (the service
// answers again, its process new), and `deploy rm` removes the namespace's
// service (its container gone) and keeps its volumes.
func TestLabServiceLogs(t *testing.T) {
	h, daemons := workloadLab(t, "dl")
	d1 := daemons[0]
	mf := writeManifest(t, "shop.toml", strings.Replace(fmt.Sprintf(shopManifest, "a", h[1].Name, "0s"),
		`PORT = "8080"`, `PORT = "8080", LOG_WRITES = "1"`, 1))
	testpoll.Until(t, 60*time.Second, "deploy", func() error {
		if out, err := d1.ctl("deploy", "-f", mf); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ip := services(t, d1)[0].ServiceIP

	follow := exec.Command(filepath.Join(d1.bin, "droverctl"), "--socket", d1.socket(), "service", "logs", "shop/web", "-f", "--json")
	out, err := follow.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	follow.Stderr = &stderr
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan ctlapi.LogLine, 100000)
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var l ctlapi.LogLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				lines <- l
			}
		}
	}()
	var writers []*writer
	for _, host := range h {
		writers = append(writers, startWriter(host, ip, 100*time.Millisecond))
	}
	time.Sleep(2 * time.Second)
	if m, _, out, err := migrateJSON(d1, "migrate", "apply", "shop/web", "--to", h[2].Name); err != nil || m.Phase != "done" {
		t.Fatalf("migrate apply: %v\n%s", err, out)
	}
	time.Sleep(2 * time.Second)
	acked := map[string]string{}
	for _, w := range writers {
		maps.Copy(acked, w.Stop())
	}
	// The last acknowledged writes reach the follower, then it stops.
	logged := map[string]int{}
	machines := map[string]bool{}
	wrote := regexp.MustCompile(`wrote (\S+) seq \d+$`)
	testpoll.Until(t, 30*time.Second, "every acknowledged write in the followed log", func() error {
		for {
			select {
			case l := <-lines:
				if m := wrote.FindStringSubmatch(l.Text); m != nil {
					logged[m[1]]++
					machines[l.Machine] = true
				}
				continue
			default:
			}
			break
		}
		for key := range acked {
			if logged[key] == 0 {
				return fmt.Errorf("write %s acknowledged, not (yet) in the log; %d of %d logged", key, len(logged), len(acked))
			}
		}
		return nil
	})
	follow.Process.Signal(os.Interrupt)
	follow.Wait()
	<-read
	for key, n := range logged {
		if n != 1 {
			t.Fatalf("write %s is in the followed log %d times", key, n)
		}
	}
	if !machines[h[1].Name] || !machines[h[2].Name] {
		t.Fatalf("the log came from %v, want %s then %s", machines, h[1].Name, h[2].Name)
	}
	if !strings.Contains(stderr.String(), "now runs on "+h[2].Name) {
		t.Fatalf("the follower did not say the service moved: %q", stderr.String())
	}
	t.Logf("%d acknowledged writes from 3 hosts, each once in the log followed across the move from %s to %s", len(acked), h[1].Name, h[2].Name)

	// The executor's metrics count the move, and promtool (Debian's
	// prometheus package) finds nothing wrong with the endpoint.
	scrape, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "5", "http://127.0.0.1:9477/metrics")
	if err != nil {
		t.Fatalf("scraping %s's metrics: %v", h[0].Name, err)
	}
	for _, want := range []string{`drover_migrations_total{outcome="done"} 1`, `drover_gossip_members{state="alive"} 3`,
		"drover_migration_downtime_seconds_count 1", "drover_raft_commit_seconds_count", "drover_wireguard_last_handshake_age_seconds{peer="} {
		if !strings.Contains(scrape, want) {
			t.Fatalf("the metrics of %s lack %q:\n%s", h[0].Name, want, scrape)
		}
	}
	lint := exec.Command("promtool", "check", "metrics")
	lint.Stdin = strings.NewReader(scrape)
	if out, err := lint.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics (make deps installs it): %v\n%s", err, out)
	}
	if _, err := h[1].Run(context.Background(), "curl", "-sf", "-m", "2", "http://"+h[0].UnderlayIP+":9477/metrics"); err == nil {
		t.Fatalf("%s's metrics answer on its underlay address: they are for its loopback only", h[0].Name)
	}

	startedAt := func() string {
		out, err := exec.Command("docker", "-H", "unix://"+h[2].DockerSock, "inspect", "-f", "{{.State.StartedAt}}", "drover-shop-web").Output()
		if err != nil {
			t.Fatalf("inspect on %s: %v", h[2].Name, err)
		}
		return strings.TrimSpace(string(out))
	}
	before := startedAt()
	if out, err := d1.ctl("service", "restart", "shop/web"); err != nil || !strings.Contains(out, "restarted on "+h[2].Name) {
		t.Fatalf("service restart: %v\n%s", err, out)
	}
	if after := startedAt(); after == before {
		t.Fatalf("the container was not restarted (started at %s both times)", after)
	}
	if _, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "5", "http://"+ip+":80/healthz"); err != nil {
		t.Fatalf("the service after its restart: %v", err)
	}
	if out, err := d1.ctl("deploy", "rm", "shop"); err != nil || !strings.Contains(out, "web (on "+h[2].Name+")") || !strings.Contains(out, "data (on "+h[2].Name+")") {
		t.Fatalf("deploy rm: %v\n%s", err, out)
	}
	testpoll.Until(t, 30*time.Second, "the removed service's container gone", func() error {
		if running, all := runningContainers(h[2]); all != 0 {
			return fmt.Errorf("%d containers (%d running) of shop/web on %s", all, running, h[2].Name)
		}
		return nil
	})
	if vs := volumes(t, d1); len(vs) != 1 || vs[0].Owner != h[2].Name {
		t.Fatalf("volumes after deploy rm: %+v", vs)
	}
	// With --volumes the owner destroys the dataset and the volume is
	// forgotten.
	if out, err := d1.ctl("deploy", "rm", "shop", "--volumes"); err != nil || !strings.Contains(out, "volumes destroyed: data (on "+h[2].Name+")") {
		t.Fatalf("deploy rm --volumes: %v\n%s", err, out)
	}
	if vs := volumes(t, d1); len(vs) != 0 {
		t.Fatalf("volumes after deploy rm --volumes: %+v", vs)
	}
	if out, err := exec.Command("zfs", "list", "-H", "-o", "name", h[2].Pool+"/drover/shop/data").CombinedOutput(); err == nil {
		t.Fatalf("the dataset is still on %s: %s", h[2].Name, out)
	}

	// Another machine tells the same story, in order.
	events, err := daemons[1].ctl("events", "--json")
	if err != nil {
		t.Fatalf("events: %v\n%s", err, events)
	}
	var told []string
	for _, line := range strings.Split(strings.TrimSpace(events), "\n") {
		var ev ctlapi.Event
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("event %q: %v", line, err)
		}
		told = append(told, ev.Kind+" "+ev.Subject+": "+ev.Message)
	}
	at := 0
	for _, want := range []string{"deploy shop/web: generation 1 on " + h[1].Name, "service shop/web: ready on " + h[1].Name,
		"migration shop/web: migration", "committed: " + h[2].Name + " owns it", ": done", "deploy shop/web: removed"} {
		found := false
		for ; at < len(told) && !found; at++ {
			found = strings.Contains(told[at], want)
		}
		if !found {
			t.Fatalf("the events on %s lack %q in order:\n%s", h[1].Name, want, strings.Join(told, "\n"))
		}
	}
}
