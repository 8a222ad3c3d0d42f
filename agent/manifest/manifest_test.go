package manifest

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
)

const good = `# a shop
namespace = "shop"

[services.web]
image = "drover-test:latest"
command = ["/testimage"]
env = { PORT = "8080", MODE = "prod" }
memory = "256MiB"
machine = "dl2"

[[services.web.ports]]
port = 80
target = 8080

[[services.web.volumes]]
name = "data"
path = "/data"
quota = "1GiB"

[services.web.readiness]
http = "/healthz"
interval = "500ms"
retries = 10

[services.cache]
image = "drover-test:latest"
stop_signal = "int"
stop_timeout = "30s"
[[services.cache.ports]]
port = 6379
protocol = "udp"
`

func TestParseGood(t *testing.T) {
	m, err := Parse("shop.toml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	want := &Manifest{Namespace: "shop", Services: []fsm.ServiceSpec{
		{Name: "cache", Image: "drover-test:latest", StopSignal: "SIGINT", StopTimeout: 30 * time.Second, Ports: []fsm.PortMapping{{Port: 6379, Target: 6379, Protocol: "udp"}}},
		{Name: "web", Image: "drover-test:latest", Command: []string{"/testimage"}, Machine: "dl2",
			Env: map[string]string{"PORT": "8080", "MODE": "prod"}, MemoryBytes: 256 << 20,
			Ports:     []fsm.PortMapping{{Port: 80, Target: 8080, Protocol: "tcp"}},
			Volumes:   []fsm.VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 30}},
			Readiness: &fsm.Readiness{Kind: "http", Path: "/healthz", Port: 8080, Interval: 500 * time.Millisecond, Timeout: time.Second, Retries: 10}},
	}}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("got  %+v\nwant %+v", m, want)
	}
}

func TestParseVolumeProperties(t *testing.T) {
	m, err := Parse("shop.toml", []byte(replace(`quota = "1GiB"`, "quota = \"1GiB\"\nrecordsize = \"8K\"\ncompression = \"gzip-6\"")))
	if err != nil {
		t.Fatal(err)
	}
	want := fsm.VolumeMount{Name: "data", MountPath: "/data", QuotaBytes: 1 << 30, RecordSize: 8 << 10, Compression: "gzip-6"}
	if got := m.Services[1].Volumes[0]; got != want {
		t.Fatalf("volume %+v, want %+v", got, want)
	}
	// The rendered manifest keeps them, and the stop, flush and process
	// settings.
	m.Services[1].Flush = []string{"psql", "-c", "CHECKPOINT"}
	m.Services[1].Entrypoint, m.Services[1].User, m.Services[1].WorkingDir = []string{"/bin/app"}, "app:app", "/srv"
	m.Services[1].Labels, m.Services[1].ReadOnly = map[string]string{"team": "shop", "tier": "front"}, true
	m.Services[1].Tmpfs = []fsm.TmpfsMount{{MountPath: "/tmp", SizeBytes: 64 << 20}, {MountPath: "/run"}}
	out := Render(m.Namespace, m.Services, nil)
	if !strings.Contains(out, "recordsize = 8192") || !strings.Contains(out, `compression = "gzip-6"`) ||
		!strings.Contains(out, `flush = ["psql", "-c", "CHECKPOINT"]`) || !strings.Contains(out, `stop_signal = "SIGINT"`) || !strings.Contains(out, `stop_timeout = "30s"`) {
		t.Fatalf("rendered:\n%s", out)
	}
	again, err := Parse("shop.toml", []byte(out))
	if err != nil || !reflect.DeepEqual(again.Services, m.Services) {
		t.Fatalf("the rendered manifest parses to %+v, %v; want %+v", again, err, m.Services)
	}
}

// replace swaps one line of the good manifest for another text.
func replace(old, new string) string {
	if !strings.Contains(good, old) {
		panic("test: no " + old)
	}
	return strings.Replace(good, old, new, 1)
}

func TestParseBad(t *testing.T) {
	cases := []struct {
		name, src, want string
	}{
		{"bad stop signal", replace(`stop_signal = "int"`, `stop_signal = "SIGSEGV"`), `shop.toml:27: services.cache.stop_signal: "SIGSEGV": want one of`},
		{"bad stop timeout", replace(`stop_timeout = "30s"`, `stop_timeout = "2h"`), `shop.toml:28: services.cache.stop_timeout: "2h" is over the limit of 1h0m0s`},
		{"sub-second stop timeout", replace(`stop_timeout = "30s"`, `stop_timeout = "500ms"`), `services.cache.stop_timeout: "500ms": want at least 1s`},
		{"unknown key", replace(`machine = "dl2"`, `machine = "dl2"
colour = "blue"`), `shop.toml:10: services.web.colour: unknown key`},
		{"bad quota", replace(`quota = "1GiB"`, `quota = "10XB"`), `shop.toml:18: services.web.volumes[0].quota: "10XB" is not a size`},
		{"negative size", replace(`memory = "256MiB"`, `memory = -5`), `shop.toml:8: services.web.memory: -5: a size must be positive`},
		{"path name", replace(`name = "data"`, `name = "../etc"`), `shop.toml:16: services.web.volumes[0].name: volume name "../etc" is not a DNS label`},
		{"uppercase namespace", replace(`namespace = "shop"`, `namespace = "Shop"`), `shop.toml:2: namespace: "Shop" is not a DNS label`},
		{"bind mount", replace(`path = "/data"`, `path = "/data"
source = "/srv/data"`), `shop.toml:18: services.web.volumes.source: unknown key: a volume is a dataset that moves with its service; a host directory is a bind`},
		{"bind without machine", replace(`machine = "dl2"`, `[[services.web.binds]]
host = "/srv/logs"
path = "/logs"`), `services.web.machine: missing: a service with binds runs where its host directories are`},
		{"bind relative host path", replace(`protocol = "udp"`, `protocol = "udp"
[[services.web.binds]]
host = "srv/logs"
path = "/logs"`), `services.web.binds[0].host: "srv/logs": want an absolute, clean path on the machine`},
		{"duplicate volume in a service", replace(`quota = "1GiB"`, `quota = "1GiB"
[[services.web.volumes]]
name = "data"
path = "/other"
quota = "1G"`), `shop.toml:20: services.web.volumes[1].name: volume "data" is listed twice`},
		{"volume shared by services", replace(`protocol = "udp"`, `protocol = "udp"
[[services.cache.volumes]]
name = "data"
path = "/c"
quota = "1G"`), `shop.toml:16: services.web.volumes[0].name: volume "data" is already used by service cache`},
		{"bad machine name", replace(`machine = "dl2"`, `machine = "DL_2"`), `shop.toml:9: services.web.machine: "DL_2" is not a machine name`},
		{"port out of range", replace(`port = 80`, `port = 70000`), `shop.toml:12: services.web.ports[0].port: 70000 is not a port`},
		{"two readiness kinds", replace(`http = "/healthz"`, `http = "/healthz"
tcp = true`), `shop.toml:20: services.web.readiness: want exactly one of http, tcp or exec, found 2`},
		{"missing image", replace(`image = "drover-test:latest"
command`, `command`), `shop.toml:4: services.web.image: missing`},
		{"syntax", replace(`port = 80`, `port = = 80`), `shop.toml:12:`},
		{"bad duration", replace(`interval = "500ms"`, `interval = "soon"`), `shop.toml:22: services.web.readiness.interval: "soon"`},
		{"bind outside the allowed", replace(`protocol = "udp"`, `protocol = "udp"
[[services.cache.binds]]
host = "/srv2/x"
path = "/x"`), `services.cache.binds[0].host: "/srv2/x" is under no host directory this daemon allows binds from (droverd --allow-bind; allowed: /srv/)`},
		{"bind of the host's root", replace(`protocol = "udp"`, `protocol = "udp"
[[services.cache.binds]]
host = "/"
path = "/host"`), `services.cache.binds[0].host: "/" is under no host directory`},
		{"volume over the root", replace(`path = "/data"`, `path = "/"`), `services.web.volumes[0].path: "/": a volume or bind cannot replace the container's root`},
		{"volume in /proc", replace(`path = "/data"`, `path = "/proc/sys"`), `services.web.volumes[0].path: "/proc/sys": not under /proc, /sys or /dev`},
		{"control character", replace(`path = "/data"`, `path = "/da\tta"`), `services.web.volumes[0].path: "/da\tta": want an absolute, clean path`},
		{"mounted twice", replace(`protocol = "udp"`, `protocol = "udp"
[[services.cache.binds]]
host = "/srv/a"
path = "/a"
[[services.cache.binds]]
host = "/srv/b"
path = "/a"`), `services.cache.binds[1].path: "/a" is mounted twice`},
		{"too many retries", replace(`retries = 10`, `retries = 99999`), `services.web.readiness.retries: 99999: want 0 to 10000`},
		{"interval too long", replace(`interval = "500ms"`, `interval = "48h"`), `services.web.readiness.interval: "48h" is over the limit of 1h0m0s`},
		{"quota too large", replace(`quota = "1GiB"`, `quota = "2048T"`), `services.web.volumes[0].quota: over the limit of 1 PiB`},
		{"recordsize not a power of two", replace(`quota = "1GiB"`, "quota = \"1GiB\"\nrecordsize = \"12K\""), `shop.toml:19: services.web.volumes[0].recordsize: 12288 bytes: want a power of two from 512B to 1MiB`},
		{"recordsize too large", replace(`quota = "1GiB"`, "quota = \"1GiB\"\nrecordsize = \"4M\""), `services.web.volumes[0].recordsize: 4194304 bytes: want a power of two`},
		{"empty entrypoint", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nentrypoint = []"), `services.cache.entrypoint: empty`},
		{"bad user", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nuser = \"root; rm\""), `services.cache.user: "root; rm": want a user name or id`},
		{"relative working_dir", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nworking_dir = \"srv\""), `services.cache.working_dir: "srv": want an absolute`},
		{"drover's label", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nlabels = { \"sh.drover.service\" = \"x\" }"), `services.cache.labels.sh.drover.service: sh.drover.* labels are drover's own`},
		{"tmpfs over a volume", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\n[[services.cache.tmpfs]]\npath = \"/proc/x\""), `services.cache.tmpfs[0].path: "/proc/x": not under /proc`},
		{"empty flush", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nflush = []"), `services.cache.flush: empty command`},
		{"unknown restart", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nrestart = \"sometimes\""), `shop.toml:29: services.cache.restart: "sometimes": want always, on-failure or no`},
		{"restart_max without on-failure", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nrestart_max = 3"), `services.cache.restart_max: only with restart = "on-failure"`},
		{"health of no kind", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\n[services.cache.health]\ninterval = \"5s\""), `services.cache.health: want exactly one of http, tcp or exec, found 0`},
		{"health without retries", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\n[services.cache.health]\nexec = [\"true\"]\nretries = 0"), `services.cache.health.retries: 0: a health check restarts after at least 1 failure`},
		{"too many cpus", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\ncpus = 5000"), `shop.toml:29: services.cache.cpus: 5000: want 0.001 to 1024 cores`},
		{"cpus not a number", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\ncpus = \"lots\""), `services.cache.cpus: "lots" is not a number of cores`},
		{"bad secret name", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nsecrets = [\"../key\"]"), `services.cache.secrets[0].name: "../key" is not a secret name`},
		{"bad secret mode", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nsecrets = [{ name = \"db\", mode = \"0200\" }]"), `services.cache.secrets[0].mode: want a readable file mode`},
		{"unknown secret key", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nsecrets = [{ name = \"db\", owner = \"me\" }]"), `services.cache.secrets[0].owner: unknown key`},
		{"secret over a volume", replace(`retries = 10`, "retries = 10\n[services.web.secrets]"), `services.web.secrets`},
		{"standby without volumes", replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\n[services.cache.standby]\ninterval = \"10s\""), `services.cache.standby: service has no volumes`},
		{"standby interval too short", replace(`retries = 10`, "retries = 10\n[services.web.standby]\ninterval = \"10ms\""), `services.web.standby.interval: "10ms": want 1s to 24h0m0s`},
		{"standby on its own machine", replace(`retries = 10`, "retries = 10\n[services.web.standby]\nmachine = \"dl2\""), `services.web.standby.machine: "dl2" is where the service runs`},
		{"after without auto", replace(`retries = 10`, "retries = 10\n[services.web.standby]\nafter = \"5s\""), `services.web.standby.after: only with failover = "auto"`},
		{"unknown failover", replace(`retries = 10`, "retries = 10\n[services.web.standby]\nfailover = \"soon\""), `services.web.standby.failover: "soon": want manual or auto`},
		{"unknown compression", replace(`quota = "1GiB"`, "quota = \"1GiB\"\ncompression = \"brotli\""), `shop.toml:19: services.web.volumes[0].compression: "brotli": want on, off, lz4`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseWith("shop.toml", []byte(c.src), Options{BindPrefixes: []string{"/srv/"}})
			var es Errors
			if !errors.As(err, &es) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got:\n%v\nwant it to contain:\n%s", err, c.want)
			}
		})
	}
}

func TestParseSupervisionAndSecrets(t *testing.T) {
	src := replace(`stop_timeout = "30s"`, `stop_timeout = "30s"
restart = "on-failure"
restart_max = 5
cpus = 0.5
secrets = ["db-password", { name = "tls", path = "/etc/tls/key.pem", uid = 999, mode = "0440" }]
[services.cache.health]
tcp = true
interval = "3s"`)
	m, err := Parse("shop.toml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	got := m.Services[0]
	if got.Restart != "on-failure" || got.RestartMax != 5 || got.MilliCPUs != 500 {
		t.Fatalf("restart %q max %d cpus %d", got.Restart, got.RestartMax, got.MilliCPUs)
	}
	wantHealth := fsm.Readiness{Kind: "tcp", Port: 6379, Interval: 3 * time.Second, Timeout: 2 * time.Second, Retries: 3}
	if got.Health == nil || !reflect.DeepEqual(*got.Health, wantHealth) {
		t.Fatalf("health %+v, want %+v", got.Health, wantHealth)
	}
	wantSecrets := []fsm.SecretMount{{Name: "db-password", Path: "/run/secrets/db-password", Mode: 0o400},
		{Name: "tls", Path: "/etc/tls/key.pem", UID: 999, Mode: 0o440}}
	if !reflect.DeepEqual(got.Secrets, wantSecrets) {
		t.Fatalf("secrets %+v, want %+v", got.Secrets, wantSecrets)
	}
	// "always" is the default and is not written.
	m, err = Parse("shop.toml", []byte(replace(`stop_timeout = "30s"`, "stop_timeout = \"30s\"\nrestart = \"always\"")))
	if err != nil || m.Services[0].Restart != "" {
		t.Fatalf("restart always: %v, %q", err, m.Services[0].Restart)
	}
	// A rendered manifest keeps them.
	out := Render("shop", []fsm.ServiceSpec{got}, nil)
	again, err := Parse("shop.toml", []byte(out))
	if err != nil || !reflect.DeepEqual(again.Services[0], got) {
		t.Fatalf("rendered:\n%s\nparses to %+v, %v", out, again, err)
	}
}

func TestParseStandby(t *testing.T) {
	m, err := Parse("shop.toml", []byte(replace(`retries = 10`, "retries = 10\n[services.web.standby]\nmachine = \"dl3\"\ninterval = \"10s\"\nfailover = \"auto\"\nafter = \"5s\"")))
	if err != nil {
		t.Fatal(err)
	}
	want := fsm.StandbySpec{Machine: "dl3", Interval: 10 * time.Second, Failover: "auto", After: 5 * time.Second}
	web := m.Services[1]
	if web.Standby == nil || *web.Standby != want {
		t.Fatalf("standby %+v, want %+v", web.Standby, want)
	}
	again, err := Parse("shop.toml", []byte(Render(m.Namespace, m.Services, nil)))
	if err != nil || !reflect.DeepEqual(again.Services, m.Services) {
		t.Fatalf("rendered back: %+v %v", again, err)
	}
	m, _ = Parse("shop.toml", []byte(replace(`retries = 10`, "retries = 10\n[services.web.standby]")))
	if got := m.Services[1].Standby; got == nil || got.Interval != 30*time.Second || got.Failover != "" {
		t.Fatalf("defaults: %+v", got)
	}
}

func TestAllProblemsReported(t *testing.T) {
	src := replace(`quota = "1GiB"`, `quota = "huge"`)
	src = strings.Replace(src, `port = 80`, `port = 0`, 1)
	_, err := Parse("shop.toml", []byte(src))
	var es Errors
	if !errors.As(err, &es) || len(es) != 2 || es[0].Line > es[1].Line {
		t.Fatalf("want two errors in file order, got %v", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte("namespace = \"x\"\n[services.a]\nimage = \"i\"\n"))
	f.Add([]byte("namespace = \"x\"\n[services.a]\nimage = \"i\"\nrestart = \"on-failure\"\nrestart_max = 2\ncpus = \"1.5\"\nsecrets = [\"s\", { name = \"t\", mode = \"0440\", uid = 7 }]\n[services.a.health]\nexec = [\"true\"]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Parse("fuzz.toml", data)
		if err != nil {
			return
		}
		if !fsm.ValidName(m.Namespace) {
			t.Fatalf("accepted namespace %q", m.Namespace)
		}
		for _, sp := range m.Services {
			if err := fsm.ValidateSpec(sp); err != nil {
				t.Fatalf("accepted an invalid spec: %v", err)
			}
		}
	})
}
