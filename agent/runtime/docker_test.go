package runtime

import (
	"bytes"
	"context"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/lab"
)

// TestDockerRunsServiceOnServiceIP runs the test image on a real engine in
// a lab host: labelled, its volume mounted, its port published on the
// service IP, readiness checked over HTTP; then re-listed and removed.
//
// The body runs inside the host's network namespace (the test binary
// re-executed there), where droverd runs and container addresses exist.
func TestDockerRunsServiceOnServiceIP(t *testing.T) {
	sock := os.Getenv("DROVER_RT_DOCKER")
	if sock == "" {
		l := lab.New(t, lab.Options{Hosts: 1, Prefix: "rt", Docker: true})
		h := l.Hosts[0]
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(ctx, filepath.Join(filepath.Dir(lab.Script()), "build-image.sh"), h.DockerSock).CombinedOutput(); err != nil {
			t.Fatalf("test image: %v\n%s", err, out)
		}
		cmd := h.Command(ctx, os.Args[0], "-test.run=^TestDockerRunsServiceOnServiceIP$", "-test.v")
		cmd.Env = append(os.Environ(), "DROVER_RT_DOCKER="+h.DockerSock)
		out, err := cmd.CombinedOutput()
		t.Logf("in %s:\n%s", h.Name, out)
		if err != nil {
			t.Fatalf("the test inside %s failed: %v", h.Name, err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ip := netip.MustParseAddr("10.211.0.9")
	if out, err := exec.Command("ip", "addr", "add", ip.String()+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	dataDir := t.TempDir()
	aliasFile := filepath.Join(t.TempDir(), "aliases.json")
	d, err := NewDocker(DockerConfig{Host: "unix://" + sock, MachineID: "machine-1", MachineName: "m1", AliasFile: aliasFile})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	rs := RunSpec{
		Namespace: "shop", Generation: 3, ServiceIP: ip,
		Mounts: map[string]string{"data": dataDir},
		Spec: fsm.ServiceSpec{
			Name: "web", Image: "drover-test:latest", Env: map[string]string{"PORT": "8080"},
			Ports:     []fsm.PortMapping{{Port: 80, Target: 8080, Protocol: "tcp"}},
			Volumes:   []fsm.VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}},
			Readiness: &fsm.Readiness{Kind: "http", Path: "/healthz", Port: 8080, Interval: 200 * time.Millisecond, Timeout: time.Second, Retries: 50},
			User:      "0:0", WorkingDir: "/", ReadOnly: true, Labels: map[string]string{"team": "shop"},
			Tmpfs: []fsm.TmpfsMount{{MountPath: "/scratch", SizeBytes: 16 << 20}},
		},
	}
	c, err := d.Start(ctx, rs)
	if err != nil {
		t.Fatal(err)
	}
	// The process keys of the spec are the container's.
	insp, err := d.cli.ContainerInspect(ctx, c.ID)
	if err != nil {
		t.Fatal(err)
	}
	if insp.Config.User != "0:0" || insp.Config.WorkingDir != "/" || insp.Config.Labels["team"] != "shop" || insp.Config.Labels[LabelService] != "web" ||
		!insp.HostConfig.ReadonlyRootfs || !strings.Contains(insp.HostConfig.Tmpfs["/scratch"], "size=16777216") {
		t.Fatalf("container config %+v, host config read-only %v tmpfs %v", insp.Config, insp.HostConfig.ReadonlyRootfs, insp.HostConfig.Tmpfs)
	}
	if err := d.WaitReady(ctx, c, rs); err != nil {
		t.Fatal(err)
	}
	raw, err := exec.CommandContext(ctx, "curl", "-sf", "-XPOST", "--data", "v", "http://"+ip.String()+":80/write?key=k").Output()
	out := string(raw)
	if err != nil || !strings.Contains(out, `"seq":1`) {
		t.Fatalf("write through the service IP: %q %v", out, err)
	}
	if b, err := os.ReadFile(filepath.Join(dataDir, "k")); err != nil || string(b) != "v" {
		t.Fatalf("data on the mounted volume: %q %v", b, err)
	}
	list, err := d.List(ctx)
	if err != nil || len(list) != 1 || list[0].Generation != 3 || list[0].Key() != "shop/web" || !list[0].Running ||
		list[0].SpecHash != rs.Hash() || list[0].StartedAt.IsZero() {
		t.Fatalf("list %+v %v", list, err)
	}
	// A failing check says so.
	bad := rs
	bad.Spec.Readiness = &fsm.Readiness{Kind: "http", Path: "/nope", Port: 8080, Interval: 50 * time.Millisecond, Timeout: time.Second, Retries: 2}
	if err := d.WaitReady(ctx, c, bad); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("failing readiness: %v", err)
	}
	if err := d.Remove(ctx, c.ID, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if list, _ := d.List(ctx); len(list) != 0 {
		t.Fatalf("after remove: %+v", list)
	}

	// An image saved and loaded under a pinned reference the engine
	// cannot know (a registry's digest): found through the alias, and a
	// service pinned to it starts, and stops on its stop signal without
	// being killed.
	saved, err := d.SaveImage(ctx, "drover-test:latest")
	if err != nil {
		t.Fatal(err)
	}
	tarball, err := io.ReadAll(saved)
	saved.Close()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("docker", "-H", "unix://"+sock, "rmi", "drover-test:latest").CombinedOutput(); err != nil {
		t.Fatalf("rmi: %v %s", err, out)
	}
	pinned := "reg.example:5000/drover/test@sha256:" + strings.Repeat("ab", 32)
	if has, _ := d.HasImage(ctx, pinned); has {
		t.Fatal("the engine has the pinned image before the load")
	}
	if err := d.LoadImage(ctx, pinned, bytes.NewReader(tarball)); err != nil {
		t.Fatal(err)
	}
	if has, err := d.HasImage(ctx, pinned); !has || err != nil {
		t.Fatalf("after the load the pinned image is not found: %v", err)
	}
	if err := d.EnsureImage(ctx, pinned, nil); err != nil {
		t.Fatalf("EnsureImage tried to pull a loaded image: %v", err)
	}
	rs.Spec.ImageRef, rs.Spec.StopSignal, rs.Spec.StopTimeout = pinned, "SIGINT", 20*time.Second
	c, err = d.Start(ctx, rs)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.WaitReady(ctx, c, rs); err != nil {
		t.Fatal(err)
	}
	if st, err := d.Stop(ctx, c.ID, rs.Spec.StopTimeout); err != nil || st.Killed {
		t.Fatalf("stop: killed %v, %v", st.Killed, err)
	}
	if err := d.Remove(ctx, c.ID, 0); err != nil {
		t.Fatal(err)
	}

	// Held: started under drover-hold, the service does not run (its port
	// answers nothing, its volume is untouched) until released; released,
	// it is ready; a restart of a released container runs the service at
	// once; removed, its marker directory goes.
	hold := filepath.Join(t.TempDir(), "drover-hold")
	build := exec.CommandContext(ctx, "go", "build", "-o", hold, "github.com/drover-sh/drover/cmd/drover-hold")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building drover-hold: %v\n%s", err, out)
	}
	holdDir := t.TempDir()
	dh, err := NewDocker(DockerConfig{Host: "unix://" + sock, MachineID: "machine-1", MachineName: "m1", HoldBinary: hold, HoldDir: holdDir,
		AliasFile: aliasFile})
	if err != nil {
		t.Fatal(err)
	}
	defer dh.Close()
	heldData := t.TempDir()
	rs.Mounts = map[string]string{"data": heldData}
	c, err = dh.CreateHeld(ctx, rs)
	if err != nil {
		t.Fatal(err)
	}
	if list, _ := dh.List(ctx); len(list) != 1 || !list[0].Held || !list[0].Running {
		t.Fatalf("held container listed as %+v", list)
	}
	time.Sleep(300 * time.Millisecond)
	if err := dh.CheckOnce(ctx, c, rs); err == nil {
		t.Fatal("a held container answered its readiness check")
	}
	if entries, _ := os.ReadDir(heldData); len(entries) != 0 {
		t.Fatalf("a held container wrote to its volume: %v", entries)
	}
	if err := dh.Release(ctx, c); err != nil {
		t.Fatal(err)
	}
	if err := dh.WaitReady(ctx, c, rs); err != nil {
		t.Fatalf("released: %v", err)
	}
	if out, err := exec.Command("docker", "-H", "unix://"+sock, "restart", "-t", "5", c.ID).CombinedOutput(); err != nil {
		t.Fatalf("restart: %v %s", err, out)
	}
	if err := dh.WaitReady(ctx, c, rs); err != nil {
		t.Fatalf("a released container after a restart: %v", err)
	}
	// Halt returns once the container's processes are gone; the
	// engine's stop ends after, without a kill.
	insp, err = dh.cli.ContainerInspect(ctx, c.ID)
	if err != nil {
		t.Fatal(err)
	}
	procs := cgroupProcs(insp.State.Pid)
	if procs == "" {
		t.Fatalf("no cgroup.procs found for the container's process %d", insp.State.Pid)
	}
	halted, wait, err := dh.Halt(ctx, c.ID, 10*time.Second)
	if err != nil || halted.Killed {
		t.Fatalf("halt: killed %v, %v", halted.Killed, err)
	}
	if b, err := os.ReadFile(procs); err == nil && len(bytes.TrimSpace(b)) > 0 {
		t.Fatalf("halted, but processes remain: %s", b)
	}
	if err := wait(); err != nil {
		t.Fatalf("the engine's stop after a halt: %v", err)
	}
	if list, _ := dh.List(ctx); len(list) != 1 || list[0].Running {
		t.Fatalf("after the halt: %+v", list)
	}
	if err := dh.Remove(ctx, c.ID, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(holdDir); len(entries) != 0 {
		t.Fatalf("marker directories left: %v", entries)
	}
}

func TestSecretFilesAreReplacedNotRewritten(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "db")
	sm := fsm.SecretMount{Name: "db", UID: os.Getuid(), GID: os.Getgid(), Mode: 0o440}
	if err := writeSecretFile(file, []byte("one"), sm); err != nil {
		t.Fatal(err)
	}
	first, err := os.Stat(file)
	if err != nil || first.Mode().Perm() != 0o440 {
		t.Fatalf("mode %v, %v; want 0440", first.Mode(), err)
	}
	if err := writeSecretFile(file, []byte("two"), fsm.SecretMount{Name: "db", UID: os.Getuid(), GID: os.Getgid()}); err != nil {
		t.Fatal(err)
	}
	second, _ := os.Stat(file)
	b, _ := os.ReadFile(file)
	if string(b) != "two" || second.Mode().Perm() != 0o400 || os.SameFile(first, second) {
		t.Fatalf("after the second write: %q, mode %v, same inode %v (a running container must keep the first)", b, second.Mode(), os.SameFile(first, second))
	}
}
