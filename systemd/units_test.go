// Package systemd holds drover's unit files; its test checks them with
// systemd-analyze verify.
package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
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
