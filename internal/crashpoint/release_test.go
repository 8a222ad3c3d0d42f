//go:build !crashpoints

package crashpoint

import "testing"

// A release build ignores DROVER_CRASH_POINT: the child armed at the very
// point it passes survives it.
func TestReleaseBuildIgnoresTheEnvironment(t *testing.T) {
	if hitInChild(t, Env+"=executor:warm-copy") {
		t.Fatal("a release build killed itself at a crash point")
	}
	t.Setenv(Env, "executor:warm-copy")
	if p := FromEnv(discard()); p.Enabled() || p.Armed() != "" {
		t.Fatalf("release build armed with %q", p.Armed())
	}
}
