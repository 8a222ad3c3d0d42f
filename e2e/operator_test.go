package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"maps"
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

// operatorManifest: b holds a volume, reads a secret, has a health check
// and half a core; a reaches b by name. %s: b's machine, a's machine.
const operatorManifest = `namespace = "shop"

[services.b]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = "%s"
secrets = ["db-password"]
cpus = 0.5

[[services.b.ports]]
port = 80
target = 8080

[[services.b.volumes]]
name = "data"
path = "/data"
quota = "256MiB"

[services.b.readiness]
http = "/healthz"
interval = "300ms"

[services.b.health]
http = "/healthz"
interval = "1s"
retries = 2

[services.a]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = "%s"

[[services.a.ports]]
port = 80
target = 8080

[services.a.readiness]
http = "/healthz"
interval = "300ms"
`

// TestLabOperator: what an operator expects around a running service, on
// the lab. A secret set from stdin is a 0400 file in b's container and
// its bytes are nowhere in any machine's fact store, snapshots or logs,
// nor in service ls --json. Service a reaches b by name from inside its
// container (b, and b.shop.drover), a host asks droverd's DNS with dig,
// and the name gives the same address before, during and after b moves
// (writers on the three hosts, every acknowledged write on the new
// owner). b fails its health check and is restarted, reported as such;
// a service that keeps exiting is reported in a crash loop; one with
// restart = "no" stays exited; cpus limit the container and a deploy
// asking more cores than any machine has is refused.
func TestLabOperator(t *testing.T) {
	h, daemons := workloadLab(t, "dp")
	d1 := daemons[0]
	secret := fmt.Sprintf("pw-%d-not-in-any-log\n", time.Now().UnixNano())
	setSecret(t, d1, "shop/db-password", secret)
	mf := writeManifest(t, "shop.toml", fmt.Sprintf(operatorManifest, h[1].Name, h[2].Name))
	testpoll.Until(t, 90*time.Second, "deploy", func() error {
		if out, err := d1.ctlWithin(60*time.Second, "deploy", "-f", mf); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ips := map[string]string{}
	for _, s := range services(t, d1) {
		ips[s.Name] = s.ServiceIP
	}
	bIP, aIP := ips["b"], ips["a"]

	// The secret, in b's container: the bytes, 0400, root's.
	checkSecret := func(want string) {
		t.Helper()
		out, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "5", "-D", "-", "http://"+bIP+":80/file?path=/run/secrets/db-password")
		if err != nil || !strings.HasSuffix(out, "\r\n\r\n"+want) || !strings.Contains(out, "X-Mode: 0400") || !strings.Contains(out, "X-Owner: 0:0") {
			t.Fatalf("the secret in b's container: %v\n%q", err, out)
		}
	}
	checkSecret(secret)

	// Names: from a's container (b alone searches shop.drover), and a
	// host's dig against droverd.
	resolve := func(name string) (string, error) {
		out, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "5", "http://"+aIP+":80/resolve?name="+name)
		return strings.TrimSpace(out), err
	}
	for _, name := range []string{"b", "b.shop.drover"} {
		if got, err := resolve(name); err != nil || got != bIP {
			t.Fatalf("a resolves %s to %q (%v), want %s", name, got, err, bIP)
		}
	}
	if out, err := h[0].Run(context.Background(), "curl", "-sf", "-m", "5", "http://"+aIP+":80/fetch?url=http://b/healthz"); err != nil || out != "ok\n" {
		t.Fatalf("a reaches b by name: %v %q", err, out)
	}
	if out, err := h[0].Run(context.Background(), "dig", "+short", "@169.254.77.53", "b.shop.drover"); err != nil || strings.TrimSpace(out) != bIP {
		t.Fatalf("dig b.shop.drover on %s: %v %q", h[0].Name, err, out)
	}
	if out, _ := h[0].Run(context.Background(), "dig", "@169.254.77.53", "nope.shop.drover"); !strings.Contains(out, "status: NXDOMAIN") {
		t.Fatalf("dig of an unknown service: %q", out)
	}

	// b moves from host 2 to host 1 under writers on the three hosts and
	// a name lookup from a's container every 100 ms.
	var writers []*writer
	for _, host := range h {
		writers = append(writers, startWriter(host, bIP, 100*time.Millisecond))
	}
	lookups := startLookups(h[0], resolve, "b", 100*time.Millisecond)
	time.Sleep(time.Second)
	if m, _, out, err := migrateJSON(d1, "migrate", "apply", "shop/b", "--to", h[0].Name); err != nil || m.Phase != "done" {
		t.Fatalf("migrate apply: %v\n%s", err, out)
	}
	time.Sleep(time.Second)
	answers, failures := lookups.Stop()
	acked := map[string]string{}
	for _, w := range writers {
		maps.Copy(acked, w.Stop())
	}
	requireAcked(t, filepath.Join(h[0].PoolMount, "drover", "shop", "data"), acked)
	if len(failures) > 0 || len(answers) != 1 || answers[bIP] == 0 {
		t.Fatalf("b resolved to %v during the move, failures %v; want only %s", answers, failures, bIP)
	}
	t.Logf("b moved with %d acknowledged writes from 3 hosts on its new owner; %d lookups of b from a's container during the move, every one %s",
		len(acked), answers[bIP], bIP)
	checkSecret(secret) // on the new owner too
	if out, err := exec.Command("docker", "-H", "unix://"+h[0].DockerSock, "inspect", "-f", "{{.HostConfig.NanoCpus}}", "drover-shop-b").CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "500000000" {
		t.Fatalf("b's CPU limit: %v %q", err, out)
	}

	// A new value reaches b only with a restart, which --restart does.
	newSecret := "second-" + secret
	setSecret(t, d1, "shop/db-password", newSecret)
	checkSecret(secret)
	setSecret(t, d1, "shop/db-password", newSecret, "--restart")
	checkSecret(newSecret)
	if out, err := d1.ctl("secret", "rm", "shop/db-password"); err == nil || !strings.Contains(out, "used by service b") {
		t.Fatalf("removing a secret in use: %v %s", err, out)
	}

	// No byte of either value in any machine's facts, snapshots or log,
	// nor in what service ls and secret ls print.
	listed, _ := d1.ctl("service", "ls", "--json")
	secretsListed, _ := d1.ctl("secret", "ls", "--json")
	for _, value := range []string{secret, newSecret} {
		needle := []byte(strings.TrimSpace(value))
		if bytes.Contains([]byte(listed+secretsListed), needle) {
			t.Fatal("a secret's value is in service ls or secret ls")
		}
		for i, host := range h {
			searched := 0
			filepath.WalkDir(filepath.Join(host.Dir, "drover"), func(p string, e fs.DirEntry, err error) error {
				if err != nil || e.IsDir() && e.Name() == "secrets" {
					return filepath.SkipDir // the tmpfs the containers' files are on
				}
				if e.Type().IsRegular() {
					if b, err := os.ReadFile(p); err == nil {
						searched++
						if bytes.Contains(b, needle) {
							t.Fatalf("a secret's value is in %s", p)
						}
					}
				}
				return nil
			})
			logBytes, err := os.ReadFile(daemons[i].proc.LogPath())
			if err != nil || bytes.Contains(logBytes, needle) {
				t.Fatalf("%s's droverd log: %v, or holds a secret's value", host.Name, err)
			}
			if searched < 3 {
				t.Fatalf("only %d files searched under %s's data dir", searched, host.Name)
			}
		}
	}

	// Unhealthy: b's health check fails twice in a row, and drover
	// restarts it; it answers again and says so.
	if _, err := h[2].Run(context.Background(), "curl", "-sf", "-m", "5", "-XPOST", "http://"+bIP+":80/sick"); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 60*time.Second, "b restarted for failing its health check", func() error {
		b := serviceNamed(t, d1, "shop", "b")
		if b.Restarts < 1 || b.LastExit == nil || b.LastExit.Reason != "unhealthy" || !b.Ready || b.Process != "running" {
			return fmt.Errorf("b: %+v", b)
		}
		return nil
	})
	if out, err := h[2].Run(context.Background(), "curl", "-sf", "-m", "5", "http://"+bIP+":80/healthz"); err != nil || out != "ok\n" {
		t.Fatalf("b after its restart: %v %q", err, out)
	}

	// A crash loop, reported; restart = "no", left exited.
	bad := writeManifest(t, "bad.toml", `namespace = "bad"

[services.crash]
image = "drover-test:latest"
env = { PORT = "8080", EXIT_AFTER = "300ms", EXIT_CODE = "3" }
machine = "`+h[2].Name+`"

[services.once]
image = "drover-test:latest"
env = { PORT = "8080", EXIT_AFTER = "300ms", EXIT_CODE = "0" }
machine = "`+h[2].Name+`"
restart = "no"
`)
	d1.ctlWithin(60*time.Second, "deploy", "-f", bad) // it may fail or not: it depends on when the readiness is seen
	testpoll.Until(t, 60*time.Second, "bad/crash in a crash loop, bad/once exited", func() error {
		crash, once := serviceNamed(t, d1, "bad", "crash"), serviceNamed(t, d1, "bad", "once")
		if crash.Process != "crash-loop" || crash.Restarts < 3 || crash.LastExit == nil || crash.LastExit.Code != 3 || crash.Ready {
			return fmt.Errorf("crash: %+v", crash)
		}
		if once.Process != "exited" || once.Restarts != 0 || once.LastExit == nil || once.LastExit.Code != 0 {
			return fmt.Errorf("once: %+v", once)
		}
		return nil
	})
	out, _ := d1.ctl("service", "ls")
	if !strings.Contains(out, "(crash-loop)") {
		t.Fatalf("service ls does not show the crash loop:\n%s", out)
	}
	t.Logf("service ls:\n%s", out)
	time.Sleep(3 * time.Second)
	if once := serviceNamed(t, d1, "bad", "once"); once.Process != "exited" || once.Restarts != 0 {
		t.Fatalf("restart = \"no\" started again: %+v", once)
	}

	// More cores than any machine has: refused, naming them.
	greedy := writeManifest(t, "greedy.toml", "namespace = \"greedy\"\n[services.g]\nimage = \"drover-test:latest\"\ncpus = 4096\n")
	if out, err := d1.ctl("deploy", "-f", greedy); err == nil || !strings.Contains(out, "cpus: 4096: want 0.001 to 1024 cores") {
		t.Fatalf("4096 cores: %v %s", err, out)
	}
	greedy = writeManifest(t, "greedy.toml", "namespace = \"greedy\"\n[services.g]\nimage = \"drover-test:latest\"\ncpus = 1000\n")
	if out, err := d1.ctl("deploy", "-f", greedy); err == nil || !strings.Contains(out, "no machine has the cores") {
		t.Fatalf("1000 cores: %v %s", err, out)
	}
}

// setSecret runs `droverctl secret set` with the value on stdin.
func setSecret(t *testing.T, d *labDaemon, name, value string, extra ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(d.bin, "droverctl"), append([]string{"--socket", d.socket(), "secret", "set", name}, extra...)...)
	cmd.Stdin = strings.NewReader(value)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("secret set %s: %v\n%s", name, err, out)
	}
}

// serviceNamed is one service as service ls --json gives it.
func serviceNamed(t testing.TB, d *labDaemon, ns, name string) ctlapi.Service {
	t.Helper()
	for _, s := range services(t, d) {
		if s.Namespace == ns && s.Name == name {
			return s
		}
	}
	t.Fatalf("no service %s/%s", ns, name)
	return ctlapi.Service{}
}

// lookups resolves a name again and again, counting the answers.
type lookups struct {
	mu       sync.Mutex
	answers  map[string]int
	failures []string
	stop     chan struct{}
	done     chan struct{}
}

func startLookups(_ *lab.Host, resolve func(string) (string, error), name string, every time.Duration) *lookups {
	l := &lookups{answers: map[string]int{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(every):
			}
			got, err := resolve(name)
			l.mu.Lock()
			if err != nil {
				l.failures = append(l.failures, err.Error())
			} else {
				l.answers[got]++
			}
			l.mu.Unlock()
		}
	}()
	return l
}

// Stop ends the lookups and returns the answers and the failures.
func (l *lookups) Stop() (map[string]int, []string) {
	close(l.stop)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.answers, l.failures
}
