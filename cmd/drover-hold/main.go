// Command drover-hold is the first process of a container that a move's
// target prepares while the source still serves: it holds the
// container's place — its network, mounts and published ports set up by
// the engine — until droverd releases it, and then replaces itself with
// the service's own command, so that starting the service at the cutover
// costs an exec, not a container start.
//
// Usage (droverd sets it up; nobody runs it by hand):
//
//	drover-hold COMMAND [ARG...]
//
// It is released by SIGUSR1, or at once when the marker file exists (a
// released container that restarts). SIGTERM or SIGINT while held end it.
// It is built static: it runs in any image, scratch ones included.
package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
)

// HoldingLine is what drover-hold writes to stderr once it is ready to be
// released.
const HoldingLine = "drover-hold: holding until released"

// releasedMarker exists, in a directory droverd mounts read-only, once
// the container was released.
const releasedMarker = "/.drover/run/released"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "drover-hold: no command to run")
		os.Exit(2)
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT)
	// The marker is read after the handler is in place, so a release
	// between the two is not lost.
	marker := releasedMarker
	if m := os.Getenv("DROVER_HOLD_MARKER"); m != "" {
		marker = m // tests only
	}
	if _, err := os.Stat(marker); err != nil {
		// droverd waits for this line before it may release the hold.
		fmt.Fprintln(os.Stderr, HoldingLine)
		if sig := <-signals; sig != syscall.SIGUSR1 {
			os.Exit(0) // stopped while held: the move was undone
		}
	}
	signal.Reset()
	path, err := exec.LookPath(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "drover-hold: %v\n", err)
		os.Exit(127)
	}
	err = syscall.Exec(path, os.Args[1:], os.Environ())
	fmt.Fprintf(os.Stderr, "drover-hold: exec %s: %v\n", path, err)
	os.Exit(126)
}
