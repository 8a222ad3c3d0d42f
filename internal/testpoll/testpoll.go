// Package testpoll waits in tests for a condition that becomes true in
// its own time (a cluster forming, a handshake, a container starting).
package testpoll

import (
	"testing"
	"time"
)

// Until polls cond every 100ms until it returns nil, and fails the test
// with the last error when timeout passes first.
func Until(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, err)
}
