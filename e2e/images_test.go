package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/lab"
)

// dockerOn runs the docker CLI against a lab host's engine.
func dockerOn(t *testing.T, h *lab.Host, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command("docker", append([]string{"-H", "unix://" + h.DockerSock}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("docker %s on %s: %v\n%s", strings.Join(args, " "), h.Name, err, out)
	}
	return string(out)
}

// writeRegistryAuth writes a login file in Docker's config.json form.
func writeRegistryAuth(t *testing.T, file, registry, user, password string) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{
		registry: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}}})
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

const registryManifest = `namespace = "reg"

[services.web]
image = "%s"
env = { PORT = "8080" }
machine = "%s"

[[services.web.ports]]
port = 80
target = 8080

[[services.web.volumes]]
name = "data"
path = "/data"
quota = "64MiB"

[services.web.readiness]
http = "/healthz"
interval = "300ms"
`

// TestLabRegistry: images from a real registry (Debian's docker-registry,
// htpasswd logins). A deploy pins the tag to its digest (the preview
// shows it) and the host that runs the service pulls it with the
// daemon's login; a wrong login, an unknown tag or an unreachable
// registry is refused before anything changes, naming the image, the
// registry and the machine; a migration's target pulls the image before
// the source stops, and a target with no route to the registry gets it
// from the source over the mesh; `image push` puts an image that is in no
// registry on other machines. The registry runs on a fourth host that
// runs no droverd.
func TestLabRegistry(t *testing.T) {
	requireLab(t)
	authFile := filepath.Join(t.TempDir(), "registry-auth.json")
	h, daemons := workloadLabJoined(t, "dg", 4, 3, "--registry-auth", authFile)
	d1 := daemons[0]
	reg, err := h[3].StartRegistry("drover", "s3cret")
	if err != nil {
		t.Fatal(err)
	}
	writeRegistryAuth(t, authFile, reg.Addr, "drover", "s3cret")

	// Push the test image into it from the registry host's engine.
	image := reg.Addr + "/drover/web:1"
	dockerOn(t, h[3], "s3cret", "login", "-u", "drover", "--password-stdin", reg.Addr)
	dockerOn(t, h[3], "", "tag", "drover-test:latest", image)
	dockerOn(t, h[3], "", "push", image)
	digest := strings.TrimSpace(dockerOn(t, h[3], "", "image", "inspect", "--format", "{{index .RepoDigests 0}}", image))
	if !strings.HasPrefix(digest, reg.Addr+"/drover/web@sha256:") {
		t.Fatalf("pushed image's digest %q", digest)
	}

	// The preview pins the tag; the host that runs it lacks it and pulls it.
	mf := writeManifest(t, "reg.toml", fmt.Sprintf(registryManifest, image, h[1].Name))
	out, err := d1.ctl("deploy", "preview", "-f", mf)
	if err != nil || !strings.Contains(out, image+" -> "+digest) {
		t.Fatalf("preview does not show %s -> %s: %v\n%s", image, digest, err, out)
	}
	if _, err := h[1].Run(context.Background(), "docker", "-H", "unix://"+h[1].DockerSock, "image", "inspect", digest); err == nil {
		t.Fatalf("%s has the image before the deploy", h[1].Name)
	}
	if out, err := d1.ctlWithin(2*time.Minute, "deploy", "-f", mf); err != nil {
		t.Fatalf("deploy: %v\n%s", err, out)
	}
	ss := services(t, d1)
	if len(ss) != 1 || !ss[0].Ready || ss[0].Machine != h[1].Name {
		t.Fatalf("services after the deploy: %+v", ss)
	}
	dockerOn(t, h[1], "", "image", "inspect", digest)
	// Bad input changes nothing and names image, registry and machine.
	before := services(t, d1)
	for _, c := range []struct {
		name, image, password, want string
	}{
		{"a wrong login", reg.Addr + "/drover/web:1", "wrong", "authentication required"},
		{"an unknown tag", reg.Addr + "/drover/web:nope", "s3cret", "manifest unknown"},
		{"an unreachable registry", h[2].UnderlayIP + ":5999/drover/web:1", "s3cret", "connection refused"},
	} {
		writeRegistryAuth(t, authFile, reg.Addr, "drover", c.password)
		bad := writeManifest(t, "bad.toml", fmt.Sprintf(registryManifest, c.image, h[1].Name))
		out, err := d1.ctl("deploy", "-f", bad)
		host, _, _ := strings.Cut(c.image, "/")
		for _, want := range []string{c.want, c.image, "registry " + host, "machine " + h[0].Name, "bad.toml"} {
			if err == nil || !strings.Contains(out, want) {
				t.Fatalf("%s: %v; the error does not name %q:\n%s", c.name, err, want, out)
			}
		}
		t.Logf("%s: %s", c.name, strings.TrimSpace(out))
	}
	writeRegistryAuth(t, authFile, reg.Addr, "drover", "s3cret")
	if after := services(t, d1); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("refused images changed services:\n%+v\n%+v", before, after)
	}

	// A migration to a host without the image pulls it there before the
	// source stops.
	moveTo := func(to *lab.Host) []ctlapi.MigrationEvent {
		t.Helper()
		info, events, out, err := migrateJSON(d1, "migrate", "apply", "reg/web", "--to", to.Name)
		if err != nil || info.Phase != "done" {
			t.Fatalf("migrate to %s: %v %+v\n%s", to.Name, err, info, out)
		}
		ip := services(t, d1)[0].ServiceIP
		for _, from := range h[:3] {
			if _, err := from.Run(context.Background(), "curl", "-sf", "-m", "5", "http://"+ip+":80/healthz"); err != nil {
				t.Fatalf("the service moved to %s does not answer %s: %v", to.Name, from.Name, err)
			}
		}
		return events
	}
	beforeStop := func(events []ctlapi.MigrationEvent, what string) {
		t.Helper()
		at := slices.IndexFunc(events, func(ev ctlapi.MigrationEvent) bool { return ev.Kind == "image" && strings.Contains(ev.Message, what) })
		stopped := slices.IndexFunc(events, func(ev ctlapi.MigrationEvent) bool { return ev.Phase == string(fsm.PhaseSourceStopped) })
		if at < 0 || stopped < 0 || at > stopped {
			t.Fatalf("%q (event %d) did not come before the source stopped (event %d): %+v", what, at, stopped, events)
		}
		t.Logf("%s", events[at].Message)
	}
	beforeStop(moveTo(h[0]), "pulled on the target")
	dockerOn(t, h[0], "", "image", "inspect", digest)

	// A target with no route to the registry gets it from the source.
	if _, err := h[2].Run(context.Background(), "ip", "route", "add", "blackhole", h[3].UnderlayIP+"/32"); err != nil {
		t.Fatal(err)
	}
	plan, err := d1.ctl("migrate", "preview", "reg/web", "--to", h[2].Name)
	if err != nil || !strings.Contains(plan, "streamed from "+h[0].Name+" over the mesh") {
		t.Fatalf("preview to a host that cannot reach the registry: %v\n%s", err, plan)
	}
	beforeStop(moveTo(h[2]), "streamed from the source")

	// An image in no registry, pushed from one engine to the others.
	dockerOn(t, h[0], "", "tag", "drover-test:latest", "local/only:1")
	out, err = d1.ctlWithin(2*time.Minute, "image", "push", "local/only:1", "--to", h[1].Name+","+h[2].Name)
	if err != nil {
		t.Fatalf("image push: %v\n%s", err, out)
	}
	t.Logf("image push:\n%s", out)
	for _, host := range h[1:3] {
		dockerOn(t, host, "", "image", "inspect", "local/only:1")
	}
	if out, err := d1.ctl("image", "push", "local/only:1", "--to", h[0].Name); err == nil || !strings.Contains(out, "this machine") {
		t.Fatalf("a push to itself: %v\n%s", err, out)
	}
}
