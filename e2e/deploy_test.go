package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/drover-sh/drover/internal/testpoll"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/lab"
)

const shopManifest = `namespace = "shop"

[services.web]
image = "drover-test:latest"
env = { PORT = "8080", MODE = "%s" }
machine = "%s"

[[services.web.ports]]
port = 80
target = 8080

[[services.web.volumes]]
name = "data"
path = "/data"
quota = "256MiB"

[services.web.readiness]
http = "/healthz"
interval = "300ms"
start_period = "%s"
`

func writeManifest(t testing.TB, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLabDeploy: a manifest deployed from host 1 runs its service on host
// 2 with its volume on host 2's ZFS; host 3 reaches it at its service IP
// over the mesh; a daemon restart does not restart it; a changed env
// re-creates it with its data; concurrent deploys serialize on the
// namespace lock; bad manifests change nothing.
func TestLabDeploy(t *testing.T) {
	h, daemons := workloadLab(t, "dd")
	d1 := daemons[0]

	// Preview changes nothing.
	mf := writeManifest(t, "shop.toml", fmt.Sprintf(shopManifest, "a", h[1].Name, "0s"))
	out, err := d1.ctl("deploy", "preview", "-f", mf)
	if err != nil || !strings.Contains(out, "create") || !strings.Contains(out, h[1].Name) || !strings.Contains(out, "data (256 MiB quota)") {
		t.Fatalf("preview: %v\n%s", err, out)
	}
	if ss := services(t, d1); len(ss) != 0 {
		t.Fatalf("preview changed something: %+v", ss)
	}

	// Deploy from host 1 onto host 2.
	if out, err := d1.ctl("deploy", "-f", mf); err != nil {
		t.Fatalf("deploy: %v\n%s", err, out)
	}
	ss := services(t, d1)
	if len(ss) != 1 || ss[0].Machine != h[1].Name || !ss[0].Ready || ss[0].ServiceIP == "" {
		t.Fatalf("service ls after deploy: %+v", ss)
	}
	ip := ss[0].ServiceIP
	ctx := context.Background()
	curl := func(host *lab.Host, args ...string) (string, error) {
		return host.Run(ctx, append([]string{"curl", "-sf", "-m", "5"}, args...)...)
	}
	// From host 3, over the mesh, at the service IP.
	var wrote string
	testpoll.Until(t, 30*time.Second, "the service answering host 3 at its service IP", func() error {
		var err error
		wrote, err = curl(h[2], "-XPOST", "--data", "hello", "http://"+ip+":80/write?key=k1")
		return err
	})
	if !strings.Contains(wrote, `"seq"`) {
		t.Fatalf("write: %q", wrote)
	}
	dataset := filepath.Join(h[1].PoolMount, "drover", "shop", "data")
	if b, err := os.ReadFile(filepath.Join(dataset, "k1")); err != nil || string(b) != "hello" {
		t.Fatalf("the write is not in host 2's dataset %s: %q %v", dataset, b, err)
	}
	vols := volumes(t, daemons[1])
	if len(vols) != 1 || vols[0].Owner != h[1].Name || vols[0].Dataset != h[1].Pool+"/drover/shop/data" {
		t.Fatalf("volume ls on the owner: %+v", vols)
	}

	// Killing and restarting droverd on host 2 leaves the container alone.
	started := containerStarted(t, h[1])
	if err := daemons[1].proc.Kill(); err != nil {
		t.Fatal(err)
	}
	daemons[1].start(t)
	testpoll.Until(t, 60*time.Second, "host 2 back in the cluster", func() error {
		ms, err := daemons[1].machines()
		if err != nil {
			return err
		}
		for _, m := range ms {
			if m.Name == h[1].Name && m.Liveness == "alive" && m.RaftRole != "none" {
				return nil
			}
		}
		return fmt.Errorf("not yet: %+v", ms)
	})
	time.Sleep(5 * time.Second) // a few reconcile rounds
	if again := containerStarted(t, h[1]); again != started {
		t.Fatalf("the daemon restart restarted the container: started %s, now %s", started, again)
	}

	// A changed env re-creates the container; the data stays.
	mf2 := writeManifest(t, "shop2.toml", fmt.Sprintf(shopManifest, "b", h[1].Name, "0s"))
	if out, err := d1.ctl("deploy", "preview", "-f", mf2); err != nil || !strings.Contains(out, "change") || !strings.Contains(out, "env") {
		t.Fatalf("preview of the change: %v\n%s", err, out)
	}
	if out, err := daemons[2].ctl("deploy", "-f", mf2); err != nil {
		t.Fatalf("deploy of the change: %v\n%s", err, out)
	}
	if now := containerStarted(t, h[1]); now == started {
		t.Fatal("the container was not re-created for a changed env")
	}
	if got, err := curl(h[2], "http://"+ip+":80/read?key=k1"); err != nil || got != "hello" {
		t.Fatalf("data after re-creation: %q %v", got, err)
	}
	if ss := services(t, d1); ss[0].Generation != 2 || !ss[0].Ready {
		t.Fatalf("after change: %+v", ss)
	}

	// Two deploys at once: one wins, the other is told who holds the lock.
	slow := []string{
		writeManifest(t, "c1.toml", fmt.Sprintf(shopManifest, "c1", h[1].Name, "4s")),
		writeManifest(t, "c2.toml", fmt.Sprintf(shopManifest, "c2", h[1].Name, "4s")),
	}
	var wg sync.WaitGroup
	racers := []*labDaemon{d1, daemons[2]}
	outs, errs := make([]string, 2), make([]error, 2)
	for i, d := range racers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = d.ctl("deploy", "-f", slow[i])
		}()
	}
	wg.Wait()
	if (errs[0] == nil) == (errs[1] == nil) {
		t.Fatalf("concurrent deploys: want exactly one to succeed:\n1: %v %s\n2: %v %s", errs[0], outs[0], errs[1], outs[1])
	}
	winner, loser := 0, 1
	if errs[0] != nil {
		winner, loser = 1, 0
	}
	if want := "locked by " + racers[winner].host.Name + "/deploy/"; !strings.Contains(outs[loser], want) {
		t.Fatalf("the refused deploy does not name the holder (%q):\n%s", want, outs[loser])
	}

	// Bad manifests: each names its problem, none changes anything.
	before := services(t, d1)
	good := fmt.Sprintf(shopManifest, "c1", h[1].Name, "0s")
	bad := map[string]struct{ text, want string }{
		"unknown key":     {strings.Replace(good, "[services.web]", "[services.web]\ncolour = \"red\"", 1), "services.web.colour: unknown key"},
		"bad quota":       {strings.Replace(good, `"256MiB"`, `"lots"`, 1), `services.web.volumes[0].quota: "lots" is not a size`},
		"bad name":        {strings.Replace(good, `name = "data"`, `name = "../data"`, 1), `volume name "../data" is not a DNS label`},
		"bind mount":      {strings.Replace(good, `path = "/data"`, "path = \"/data\"\nsource = \"/srv\"", 1), "a host directory is a bind"},
		"unknown machine": {strings.Replace(good, `machine = "`+h[1].Name+`"`, `machine = "nowhere"`, 1), `no machine named "nowhere"`},
	}
	for name, c := range bad {
		f := writeManifest(t, "bad.toml", c.text)
		out, err := d1.ctl("deploy", "-f", f)
		if err == nil || !strings.Contains(out, c.want) || !strings.Contains(out, "bad.toml") {
			t.Errorf("%s: err %v, output %q; want it to name %q and the file", name, err, out, c.want)
		}
	}
	if after := services(t, d1); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("bad manifests changed services:\n%+v\n%+v", before, after)
	}

	// An image that cannot be pinned is refused before anything changes,
	// naming the file, the service, the image, its registry and the
	// machine that asked (a registry on the engine's own loopback: nothing
	// answers there, and nothing leaves the lab).
	unknown := writeManifest(t, "unknown.toml", `namespace = "lab"
[services.ghost]
image = "localhost:1/no-such-image:1"
`)
	out, err = d1.ctl("deploy", "-f", unknown)
	for _, want := range []string{"unknown.toml", "services.ghost.image", "localhost:1/no-such-image:1", "registry localhost:1", "machine " + h[0].Name} {
		if err == nil || !strings.Contains(out, want) {
			t.Fatalf("deploy of an unknown image: %v; the output does not name %q:\n%s", err, want, out)
		}
	}
	if after := services(t, d1); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("a refused image changed services:\n%+v\n%+v", before, after)
	}

	// A deploy whose service cannot start says which, where and why.
	broken := writeManifest(t, "broken.toml", fmt.Sprintf(`namespace = "lab"
[services.broken]
image = "drover-test:latest"
env = { PORT = "8080" }
machine = "%s"
[[services.broken.ports]]
port = 80
target = 8080
[services.broken.readiness]
http = "/no-such-page"
interval = "200ms"
retries = 2
`, h[2].Name))
	out, err = d1.ctl("deploy", "-f", broken)
	if err == nil || !strings.Contains(out, "lab/broken failed on "+h[2].Name) || !strings.Contains(out, "GET /no-such-page: 404") {
		t.Fatalf("failing deploy: %v\n%s", err, out)
	}
}

func services(t testing.TB, d *labDaemon) []ctlapi.Service {
	t.Helper()
	out, err := d.ctl("service", "ls", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ss []ctlapi.Service
	if err := json.Unmarshal([]byte(out), &ss); err != nil {
		t.Fatal(err)
	}
	return ss
}

func volumes(t testing.TB, d *labDaemon) []ctlapi.Volume {
	t.Helper()
	out, err := d.ctl("volume", "ls", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []ctlapi.Volume
	if err := json.Unmarshal([]byte(out), &vs); err != nil {
		t.Fatal(err)
	}
	return vs
}

// containerStarted is the start time Docker records for shop/web on host.
func containerStarted(t *testing.T, host *lab.Host) string {
	t.Helper()
	out, err := exec.Command("docker", "-H", "unix://"+host.DockerSock, "inspect", "-f", "{{.State.StartedAt}}", "drover-shop-web").CombinedOutput()
	if err != nil {
		t.Fatalf("docker inspect on %s: %v: %s", host.Name, err, out)
	}
	return strings.TrimSpace(string(out))
}

// workloadLab is three lab hosts with Docker, ZFS and the test image, and
// a droverd on each (host 1 inits, the others join), waited for until all
// three are in Raft with overlay addresses.
func workloadLab(t testing.TB, prefix string, extra ...string) ([]*lab.Host, []*labDaemon) {
	t.Helper()
	return workloadLabN(t, prefix, 3, extra...)
}

// workloadLabN is workloadLab with n hosts.
func workloadLabN(t testing.TB, prefix string, hosts int, extra ...string) ([]*lab.Host, []*labDaemon) {
	t.Helper()
	return workloadLabJoined(t, prefix, hosts, hosts, extra...)
}

// workloadLabJoined is a workload lab of hosts hosts where droverd runs,
// in the cluster, on the first joined only: the others are spare.
func workloadLabJoined(t testing.TB, prefix string, hosts, joined int, extra ...string) ([]*lab.Host, []*labDaemon) {
	t.Helper()
	requireLab(t)
	bin := binaries(t)
	l := lab.New(t, lab.Options{Hosts: hosts, Prefix: prefix, Docker: true, ZFS: true})
	h := l.Hosts
	var socks []string
	for _, host := range h {
		socks = append(socks, host.DockerSock)
	}
	if out, err := exec.Command(filepath.Join(filepath.Dir(lab.Script()), "build-image.sh"), socks...).CombinedOutput(); err != nil {
		t.Fatalf("test image: %v\n%s", err, out)
	}
	t.Setenv("PATH", filepath.Join(filepath.Dir(lab.Script()), "zfs-shim")+":"+os.Getenv("PATH"))
	work := func(host *lab.Host) []string {
		return append([]string{"--docker-host", "unix://" + host.DockerSock, "--zfs-parent", host.Pool + "/drover"}, extra...)
	}
	d1 := startLabDaemon(t, bin, h[0], append(work(h[0]), "--init")...)
	tokenFile := joinTokenFile(t, d1)
	daemons := []*labDaemon{d1}
	for _, host := range h[1:joined] {
		daemons = append(daemons, startLabDaemon(t, bin, host, append(work(host), "--join-token-file", tokenFile)...))
	}
	testpoll.Until(t, 90*time.Second, fmt.Sprintf("%d machines with overlay addresses", joined), func() error {
		for _, d := range daemons {
			ms, err := d.machines()
			if err != nil {
				return err
			}
			n := 0
			for _, m := range ms {
				if m.OverlayIP != "" && m.Liveness == "alive" && m.RaftRole != "none" {
					n++
				}
			}
			if n != joined {
				return fmt.Errorf("%s: %d of %d ready", d.host.Name, n, joined)
			}
		}
		return nil
	})
	// Formed means every pair of machines reaches the other over the
	// mesh too: the facts and Raft roles above can come to a machine
	// from any one server. How long this takes past the above is logged:
	// a pair that waits long is worth a look (CI once saw one pair get no
	// handshake for the whole of a test).
	formed := time.Now()
	testpoll.Until(t, 60*time.Second, "a WireGuard handshake between every pair of machines", func() error {
		for _, d := range daemons {
			if err := handshakenWithAll(d, len(daemons)-1); err != nil {
				return err
			}
		}
		return nil
	})
	if waited := time.Since(formed); waited > 5*time.Second {
		t.Logf("the mesh had a handshake between every pair %v after the cluster formed", waited.Round(100*time.Millisecond))
	}
	return h, daemons
}

// handshakenWithAll checks that d's mesh has at least others peers, each
// with a handshake and traffic received.
func handshakenWithAll(d *labDaemon, others int) error {
	out, err := d.ctl("mesh", "status", "--json")
	if err != nil {
		return err
	}
	var ms ctlapi.MeshStatus
	if err := json.Unmarshal([]byte(out), &ms); err != nil {
		return fmt.Errorf("%s mesh status: %w", d.host.Name, err)
	}
	ready := 0
	for _, p := range ms.Peers {
		if p.LastHandshake == nil || p.RxBytes == 0 {
			return fmt.Errorf("%s: no handshake yet with %s (%s, endpoint %q, allowed %v)", d.host.Name, p.Machine, p.PublicKey, p.Endpoint, p.AllowedIPs)
		}
		ready++
	}
	if ready < others {
		return fmt.Errorf("%s: %d mesh peers, want %d", d.host.Name, ready, others)
	}
	return nil
}
