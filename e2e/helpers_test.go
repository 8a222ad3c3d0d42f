// Package e2e holds the tests that run drover's built binaries: on
// loopback (always) and on a lab of network-namespace hosts (DROVER_E2E=1,
// root).
package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/internal/testpoll"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// binaries returns a directory holding droverd and droverctl: DROVER_BIN
// when set (make builds them), else built once for this test run. Both
// are test builds: crash points compile in only with -tags crashpoints.
func binaries(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv("DROVER_BIN"); dir != "" {
		return dir
	}
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "drover-e2e-bin-")
		if buildErr != nil {
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Dir(filepath.Dir(file))
		cmd := exec.Command("go", "build", "-race", "-tags", "crashpoints", "-o", buildDir+"/", "./cmd/droverd", "./cmd/droverctl")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = &buildError{err: err, out: string(out)}
		}
	})
	if buildErr != nil {
		t.Fatalf("building binaries: %v", buildErr)
	}
	return buildDir
}

// fillRandom writes MiB of random data into dir, 64 MiB per file, once
// dir is mounted: the volume of a service just deployed is made by its
// machine's reconciler a moment later, and data written before its mount
// would land in the parent dataset, hidden under it.
func fillRandom(b testing.TB, dir string, mib int) {
	b.Helper()
	testpoll.Until(b, 60*time.Second, dir+" mounted", func() error { return mounted(dir) })
	for i := 0; mib > 0; i++ {
		n := min(mib, 64)
		out, err := exec.Command("dd", "if=/dev/urandom", "of="+filepath.Join(dir, fmt.Sprintf("bulk%d", i)), "bs=1M", fmt.Sprintf("count=%d", n), "conv=fsync").CombinedOutput()
		if err != nil {
			b.Fatalf("writing %d MiB into %s: %v: %s", n, dir, err, out)
		}
		mib -= n
	}
}

// mounted says whether dir is a mount point (each ZFS dataset is one).
func mounted(dir string) error {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return nil
		}
	}
	return fmt.Errorf("%s is not mounted", dir)
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}
