// Package systemd holds drover's unit files; its test checks them with
// systemd-analyze verify.
package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestUnitsVerify runs `systemd-analyze verify` on every unit, with the
// binaries they name replaced by an executable that exists here, and
// fails on any complaint (verify exits 0 on unknown keys, so its output
// counts too).
func TestUnitsVerify(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatal("systemd-analyze is missing: install the systemd package (make deps)")
	}
	units, _ := filepath.Glob("*.service")
	if len(units) == 0 {
		t.Fatal("no unit files found")
	}
	dir := t.TempDir()
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		text := strings.ReplaceAll(string(b), "/usr/local/bin/", "/bin/true #")
		if err := os.WriteFile(filepath.Join(dir, u), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range units {
		cmd := exec.Command("systemd-analyze", "verify", filepath.Join(dir, u))
		cmd.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+dir+":")
		out, err := cmd.CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("%s: systemd-analyze verify: %v\n%s", u, err, out)
		}
	}
}

func TestDroverdUnitIsNotify(t *testing.T) {
	b, err := os.ReadFile("droverd.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "Restart=on-failure", "StateDirectory=drover", "RuntimeDirectory=drover", "TimeoutStopSec="} {
		if !strings.Contains(string(b), want) {
			t.Errorf("droverd.service lacks %s", want)
		}
	}
}

// unitValue gives the value of the first key= line of a unit file.
func unitValue(t *testing.T, unit, key string) string {
	t.Helper()
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key+"="); ok {
			return v
		}
	}
	t.Fatalf("%s has no %s=", unit, key)
	return ""
}

// TestDrainUnitStopsFirstAndOutlastsItsDeadline: the drain runs in
// ExecStop, the unit starts after droverd, Docker and the network (so it
// stops before them), and systemd waits longer than the drain's deadline.
func TestDrainUnitStopsFirstAndOutlastsItsDeadline(t *testing.T) {
	const unit = "drover-drain.service"
	after := strings.Fields(unitValue(t, unit, "After"))
	for _, want := range []string{"droverd.service", "docker.service", "network-online.target"} {
		if !slices.Contains(after, want) {
			t.Errorf("%s is not ordered after %s (After=%v)", unit, want, after)
		}
	}
	stop := strings.Fields(unitValue(t, unit, "ExecStop"))
	if len(stop) < 4 || stop[0] != "/usr/local/bin/droverctl" || strings.Join(stop[1:4], " ") != "machine drain self" || !slices.Contains(stop, "--wait") {
		t.Fatalf("ExecStop=%v, want droverctl machine drain self --wait --deadline=...", stop)
	}
	var deadline time.Duration
	for _, arg := range stop {
		if v, ok := strings.CutPrefix(arg, "--deadline="); ok {
			d, err := time.ParseDuration(v) // droverctl reads Go durations
			if err != nil {
				t.Fatalf("deadline %q: %v", v, err)
			}
			deadline = d
		}
	}
	timeout, err := time.ParseDuration(strings.Replace(unitValue(t, unit, "TimeoutStopSec"), "min", "m", 1))
	if err != nil || deadline == 0 || timeout <= deadline {
		t.Fatalf("TimeoutStopSec %v must exceed the drain deadline %v (%v)", timeout, deadline, err)
	}
	if dt, err := time.ParseDuration(strings.Replace(unitValue(t, "droverd.service", "TimeoutStopSec"), "min", "m", 1)); err != nil || dt < time.Minute {
		t.Fatalf("droverd.service TimeoutStopSec %v: want room for a clean leave (%v)", dt, err)
	}
}

// TestInstallPlacesBinariesAndUnits runs the install script on a copy of
// the tree, staged in DESTDIR with another PREFIX.
func TestInstallPlacesBinariesAndUnits(t *testing.T) {
	tree, dest := t.TempDir(), t.TempDir()
	for _, d := range []string{"bin", "systemd"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"install.sh", "droverd.service", "drover-drain.service"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tree, "systemd", f), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range []string{"droverd", "droverctl", "drover-hold"} {
		if err := os.WriteFile(filepath.Join(tree, "bin", b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(filepath.Join(tree, "systemd", "install.sh"))
	cmd.Env = append(os.Environ(), "DESTDIR="+dest, "PREFIX=/opt/drover", "UNITDIR=/lib/systemd/system")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	for path, mode := range map[string]os.FileMode{
		"/opt/drover/bin/droverd": 0o755, "/opt/drover/bin/droverctl": 0o755, "/opt/drover/bin/drover-hold": 0o755,
		"/lib/systemd/system/droverd.service": 0o644, "/lib/systemd/system/drover-drain.service": 0o644,
	} {
		st, err := os.Stat(filepath.Join(dest, path))
		if err != nil {
			t.Fatalf("not installed: %v", err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s has mode %v, want %v", path, st.Mode().Perm(), mode)
		}
	}
	b, _ := os.ReadFile(filepath.Join(dest, "/lib/systemd/system/drover-drain.service"))
	if !strings.Contains(string(b), "ExecStop=/opt/drover/bin/droverctl machine drain self") || strings.Contains(string(b), "/usr/local/bin") {
		t.Fatalf("installed unit does not name the installed droverctl:\n%s", b)
	}
}
