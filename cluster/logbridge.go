package cluster

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"strings"
)

// levelWriter turns the text lines that memberlist and raft write
// ("... [WARN] memberlist: ...") into slog records at the level named in
// the line, so that both libraries log through the daemon's one logger.
type levelWriter struct {
	logger *slog.Logger
}

var levelTags = []struct {
	tag   string
	level slog.Level
}{
	{"[TRACE]", slog.LevelDebug - 4},
	{"[DEBUG]", slog.LevelDebug},
	{"[INFO]", slog.LevelInfo},
	{"[WARN]", slog.LevelWarn},
	{"[ERR]", slog.LevelError},
	{"[ERROR]", slog.LevelError},
}

func newLevelWriter(logger *slog.Logger, component string) io.Writer {
	return &levelWriter{logger: logger.With("component", component)}
}

func (w *levelWriter) Write(p []byte) (int, error) {
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		text := string(line)
		level := slog.LevelInfo
		for _, t := range levelTags {
			if i := strings.Index(text, t.tag); i >= 0 {
				level = t.level
				text = strings.TrimSpace(text[i+len(t.tag):])
				break
			}
		}
		if w.logger.Enabled(context.Background(), level) {
			w.logger.Log(context.Background(), level, text)
		}
	}
	return len(p), nil
}
