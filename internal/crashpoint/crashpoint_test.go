package crashpoint

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// TestMain lets a test run this binary again as the process that hits a
// point: in a child with crashChildEnv set, it only does that.
func TestMain(m *testing.M) {
	if point := os.Getenv(crashChildEnv); point != "" {
		p := FromEnv(discard())
		p.Hit("executor", "warm-copy")
		os.Exit(0) // survived
	}
	os.Exit(m.Run())
}

const crashChildEnv = "CRASHPOINT_TEST_CHILD"

// hitInChild runs a child process armed through env that hits
// executor:warm-copy, and tells whether SIGKILL ended it.
func hitInChild(t *testing.T, env ...string) (killed bool) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, crashChildEnv+"=1")...)
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
		t.Fatalf("child ended with %v, neither survived nor SIGKILLed", err)
	}
	if err != nil {
		t.Fatalf("running child: %v", err)
	}
	return false
}

func TestNilAndUnsetAreNeverArmed(t *testing.T) {
	var p *Points
	p.Hit("executor", "warm-copy") // must not panic nor kill
	if p.Enabled() || p.Armed() != "" {
		t.Fatal("nil Points armed")
	}
	t.Setenv(Env, "")
	t.Setenv(FileEnv, "")
	if q := FromEnv(discard()); q.Enabled() {
		t.Fatal("Points armed with an empty environment")
	}
}

func TestFileArmsOnlyTheNamedPoint(t *testing.T) {
	file := filepath.Join(t.TempDir(), "point")
	if err := os.WriteFile(file, []byte("target:cleanup\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if hitInChild(t, FileEnv+"="+file) {
		t.Fatal("a child armed at target:cleanup died at executor:warm-copy")
	}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
