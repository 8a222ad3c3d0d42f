package agent

import (
	"context"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// CrashPointEnv names a point at which droverd kills itself with SIGKILL,
// for the crash tests only: "<role>:<point>", role one of executor,
// source, target; point one of warm-copy, source-stopped, final-send,
// target-started, committed, cleanup. Unset, every crash point is a no-op.
const CrashPointEnv = "DROVER_CRASH_POINT"

// CrashPointFileEnv names a file holding such a point, read each time a
// point is passed, so a test arms a running daemon without restarting it.
const CrashPointFileEnv = "DROVER_CRASH_POINT_FILE"

// crashHooked tells whether a test hook is set at all.
func (a *Agent) crashHooked() bool { return a.crashAt != "" || a.crashFile != "" }

// armedCrashPoint is the point this daemon dies at, if any.
func (a *Agent) armedCrashPoint() string {
	if a.crashAt != "" || a.crashFile == "" {
		return a.crashAt
	}
	b, err := os.ReadFile(a.crashFile)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// crashPoint kills this daemon, as SIGKILL would from outside, when the
// test hook names role:point. Nothing after it runs.
func (a *Agent) crashPoint(role, point string) {
	if a.armedCrashPoint() != role+":"+point {
		return
	}
	a.logger.Error("test crash point reached: killing this daemon with SIGKILL", "point", role+":"+point)
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // the signal is on its way; nothing else may run
}

// watchCrashPhases serves the one crash point that is no step of this
// daemon's own: the source's "target-started", reached while the target
// starts the service and the source does nothing. It watches the facts
// and fires when a migration from this machine enters target-starting.
// It runs only when a test hook is set.
func (a *Agent) watchCrashPhases(ctx context.Context, n *cluster.Node) {
	defer a.wg.Done()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if a.armedCrashPoint() != "source:target-started" {
			continue
		}
		n.Read(func(s *fsm.State) {
			for _, m := range s.Migrations() {
				if m.SourceID == a.machineID && m.Phase == fsm.PhaseTargetStarting {
					a.crashPoint("source", "target-started")
				}
			}
		})
	}
}
