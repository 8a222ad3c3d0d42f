// Command droverctl is drover's operator command line. It talks only to
// the local droverd, over its control socket.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/drover-sh/drover/agent/ctlapi"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run is the whole CLI: results to stdout, diagnostics to stderr, an exit
// code back.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ctlapi.ErrDaemonNotRunning):
		fmt.Fprintln(stderr, oneLine(err.Error()))
	default:
		fmt.Fprintln(stderr, "droverctl: "+oneLine(err.Error()))
	}
	return 1
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
