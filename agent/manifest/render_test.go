package manifest

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
)

func TestRenderParsesBackToTheSameSpecs(t *testing.T) {
	specs := []fsm.ServiceSpec{
		{Name: "web", Image: "shop/web:2", Machine: "beta", Command: []string{"/web", "--port=8080"},
			Env: map[string]string{"MODE": "a \"quoted\" value", "B": "2"}, MemoryBytes: 64 << 20,
			Ports:     []fsm.PortMapping{{Port: 80, Target: 8080, Protocol: "tcp"}, {Port: 53, Target: 53, Protocol: "udp"}},
			Volumes:   []fsm.VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 256 << 20}, {Name: "logs", MountPath: "/logs", QuotaBytes: 1 << 30}},
			Readiness: &fsm.Readiness{Kind: "http", Path: "/healthz", Port: 8080, Interval: 300 * time.Millisecond, Timeout: time.Second, Retries: 5, StartPeriod: 2 * time.Second}},
		{Name: "cache", Image: "cache:1", Machine: "alpha", Binds: []fsm.BindMount{{HostPath: "/srv/cache", MountPath: "/cache", ReadOnly: true}, {HostPath: "/var/log", MountPath: "/log"}}, Readiness: &fsm.Readiness{Kind: "exec", Command: []string{"/check"}, Interval: time.Second, Timeout: time.Second, Retries: 3}},
	}
	text := Render("shop", specs, map[string]bool{"web": true})
	m, err := ParseWith("rendered.toml", []byte(text), Options{BindPrefixes: []string{"/srv", "/var/log"}})
	if err != nil {
		t.Fatalf("rendered manifest does not parse: %v\n%s", err, text)
	}
	if m.Namespace != "shop" || len(m.Services) != 2 || !m.Move["web"] || m.Move["cache"] {
		t.Fatalf("parsed back %+v\n%s", m, text)
	}
	want := map[string]fsm.ServiceSpec{}
	for _, sp := range specs {
		want[sp.Name] = sp
	}
	for _, got := range m.Services {
		g, _ := json.Marshal(got)
		w, _ := json.Marshal(want[got.Name])
		if string(g) != string(w) {
			t.Errorf("service %s:\n got %s\nwant %s", got.Name, g, w)
		}
	}
}

func TestMoveMarksAllOrNone(t *testing.T) {
	text := `namespace = "shop"
[services.web]
image = "img"
machine = "beta"
[[services.web.volumes]]
name = "data"
path = "/data"
quota = "1MiB"
move = true
[[services.web.volumes]]
name = "logs"
path = "/logs"
quota = "1MiB"
`
	_, err := Parse("m.toml", []byte(text))
	if err == nil || !strings.Contains(err.Error(), "services.web.volumes: 1 of 2 volumes are marked move = true") {
		t.Fatalf("half-marked service: %v", err)
	}
	allMarked := text + "move = true\n"
	if m, err := Parse("m.toml", []byte(allMarked)); err != nil || !m.Move["web"] {
		t.Fatalf("every volume marked: %v %+v", err, m)
	}
	noMachine := strings.Replace(allMarked, "machine = \"beta\"\n", "", 1)
	if _, err := Parse("m.toml", []byte(noMachine)); err == nil || !strings.Contains(err.Error(), "need the machine to move to") {
		t.Fatalf("move without machine: %v", err)
	}
}
