package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain runs the command itself when the tests start this binary as
// drover-hold.
func TestMain(m *testing.M) {
	if os.Getenv("DROVER_HOLD_TEST_MAIN") == "1" {
		os.Args = append([]string{"drover-hold"}, os.Args[1:]...)
		main()
		return
	}
	os.Exit(m.Run())
}

// hold starts drover-hold (this test binary) with marker as its marker
// file and a command that writes "ran" to out.
func hold(t *testing.T, marker, out string) (*exec.Cmd, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "sh", "-c", "echo ran > "+out)
	cmd.Env = append(os.Environ(), "DROVER_HOLD_TEST_MAIN=1", "DROVER_HOLD_MARKER="+marker)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, bufio.NewReader(stderr)
}

// waitHolding waits until the process says it holds.
func waitHolding(t *testing.T, stderr *bufio.Reader) {
	t.Helper()
	line, err := stderr.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != HoldingLine {
		t.Fatalf("drover-hold said %q, %v", line, err)
	}
}

func ran(out string) bool {
	b, _ := os.ReadFile(out)
	return strings.TrimSpace(string(b)) == "ran"
}

func TestHeldUntilReleased(t *testing.T) {
	dir := t.TempDir()
	marker, out := filepath.Join(dir, "released"), filepath.Join(dir, "out")
	cmd, stderr := hold(t, marker, out)
	waitHolding(t, stderr)
	time.Sleep(100 * time.Millisecond)
	if ran(out) {
		t.Fatal("the command ran before the release")
	}
	if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("released: %v", err)
	}
	if !ran(out) {
		t.Fatal("the command did not run after the release")
	}
}

func TestReleasedBeforeRunsAtOnce(t *testing.T) {
	dir := t.TempDir()
	marker, out := filepath.Join(dir, "released"), filepath.Join(dir, "out")
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd, _ := hold(t, marker, out)
	if err := cmd.Wait(); err != nil || !ran(out) {
		t.Fatalf("a released container's restart: %v, ran %v", err, ran(out))
	}
}

func TestStoppedWhileHeldRunsNothing(t *testing.T) {
	dir := t.TempDir()
	marker, out := filepath.Join(dir, "released"), filepath.Join(dir, "out")
	cmd, stderr := hold(t, marker, out)
	waitHolding(t, stderr)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil || ran(out) {
		t.Fatalf("stopped while held: %v, ran %v", err, ran(out))
	}
}
