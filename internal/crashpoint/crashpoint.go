// Package crashpoint kills the daemon at named places in its code, for
// the crash tests only. Crash points compile in only with the build tag
// `crashpoints` (the e2e and bench builds set it, see the Makefile); a
// release build has no code that kills the process and ignores the
// environment below.
package crashpoint

import (
	"log/slog"
	"os"
	"strings"
)

// Env names a point at which droverd kills itself with SIGKILL:
// "<role>:<point>", role one of executor, source, target; point one of
// warm-copy, source-stopped, final-send, target-started, committed,
// cleanup.
const Env = "DROVER_CRASH_POINT"

// FileEnv names a file holding such a point, read each time a point is
// passed, so a test arms a running daemon without restarting it.
const FileEnv = "DROVER_CRASH_POINT_FILE"

// Points is what this process was armed with. The zero value and nil are
// never armed.
type Points struct {
	at, file string
	logger   *slog.Logger
}

// FromEnv reads Env and FileEnv. In a release build it returns Points
// that are never armed, and says so when either is set.
func FromEnv(logger *slog.Logger) *Points {
	at, file := os.Getenv(Env), os.Getenv(FileEnv)
	if at == "" && file == "" {
		return &Points{logger: logger}
	}
	if !compiledIn {
		logger.Warn("crash points are set in the environment, but this is a release build without them: ignored", "env", Env, "file_env", FileEnv)
		return &Points{logger: logger}
	}
	logger.Warn("test crash hook set: this daemon kills itself at the named point", "point", at, "file", file)
	return &Points{at: at, file: file, logger: logger}
}

// Enabled tells whether any point may be armed.
func (p *Points) Enabled() bool { return p != nil && (p.at != "" || p.file != "") }

// Armed is the point this process dies at, if any.
func (p *Points) Armed() string {
	if !p.Enabled() {
		return ""
	}
	if p.at != "" {
		return p.at
	}
	b, err := os.ReadFile(p.file)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Hit kills this process, as SIGKILL would from outside, when role:point
// is armed. Nothing after it runs.
func (p *Points) Hit(role, point string) {
	if !p.Enabled() || p.Armed() != role+":"+point {
		return
	}
	p.logger.Error("test crash point reached: killing this daemon with SIGKILL", "point", role+":"+point)
	kill()
}
