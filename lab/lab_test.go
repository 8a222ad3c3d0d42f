package lab

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestHostsRunWorkloads brings up two hosts with Docker and ZFS, runs the
// test image on a ZFS dataset in one and talks to it from the other.
func TestHostsRunWorkloads(t *testing.T) {
	l := New(t, Options{Hosts: 2, Prefix: "lt", Docker: true, ZFS: true})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := h1.Run(ctx, "ping", "-c1", "-W2", h2.UnderlayIP); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, filepath.Join(filepath.Dir(Script()), "build-image.sh"), h1.DockerSock, h2.DockerSock).CombinedOutput()
	if err != nil {
		t.Fatalf("building the test image: %v\n%s", err, out)
	}
	if out, err := exec.Command("zfs", "create", h1.Pool+"/vol").CombinedOutput(); err != nil {
		t.Fatalf("zfs create: %v\n%s", err, out)
	}
	mount := filepath.Join(h1.PoolMount, "vol")
	if out, err := exec.Command("docker", "-H", "unix://"+h1.DockerSock, "run", "-d", "--name", "workload",
		"-p", h1.UnderlayIP+":8080:8080", "-v", mount+":/data", "drover-test:latest").CombinedOutput(); err != nil {
		t.Fatalf("docker run: %v\n%s", err, out)
	}
	url := "http://" + h1.UnderlayIP + ":8080"
	var got string
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err = h2.Run(ctx, "curl", "-sf", "-XPOST", "--data", "payload", url+"/write?key=k"); err == nil {
			got, err = h2.Run(ctx, "curl", "-sf", url+"/read?key=k")
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil || got != "payload" {
		t.Fatalf("read back %q: %v", got, err)
	}
	if out, err := exec.Command("cat", filepath.Join(mount, "journal")).Output(); err != nil || !strings.HasPrefix(string(out), "1 k ") {
		t.Fatalf("journal on the ZFS dataset: %q %v", out, err)
	}
}
