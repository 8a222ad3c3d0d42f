//go:build crashpoints

package crashpoint

import "testing"

// A test build dies at the armed point, named in the environment or in
// the file.
func TestTestBuildDiesAtTheArmedPoint(t *testing.T) {
	if !hitInChild(t, Env+"=executor:warm-copy") {
		t.Fatal("a test build armed at executor:warm-copy survived it")
	}
	if hitInChild(t, Env+"=executor:committed") {
		t.Fatal("a test build armed at executor:committed died at executor:warm-copy")
	}
}
