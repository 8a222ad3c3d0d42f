package runtime

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/pkg/stdcopy"
)

// LogLine is one line a container wrote, with the engine's timestamp.
type LogLine struct {
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"` // stdout or stderr
	Text   string    `json:"text"`
}

// LogOptions choose a container's log lines: after Since (zero: from the
// start), the last Tail of them (0: all), and with Follow the lines to
// come until the container stops.
type LogOptions struct {
	Since  time.Time
	Tail   int
	Follow bool
}

// Logs passes the container's log lines to emit, in order, until the
// log ends (with Follow: until the container stops) or ctx ends. The
// line drover-hold writes while it holds a container is left out: it is
// drover's, not the service's.
func (d *Docker) Logs(ctx context.Context, id string, opts LogOptions, emit func(LogLine)) error {
	o := container.LogsOptions{ShowStdout: true, ShowStderr: true, Timestamps: true, Follow: opts.Follow}
	if !opts.Since.IsZero() {
		o.Since = strconv.FormatFloat(float64(opts.Since.UnixNano())/1e9, 'f', 9, 64)
	}
	if opts.Tail > 0 {
		o.Tail = strconv.Itoa(opts.Tail)
	}
	rc, err := d.cli.ContainerLogs(ctx, id, o)
	if err != nil {
		return fmt.Errorf("logs of container %s: %w", id, err)
	}
	defer rc.Close()
	var mu sync.Mutex // both streams' lines go to one emit
	out, errOut := lineWriter("stdout", opts.Since, &mu, emit), lineWriter("stderr", opts.Since, &mu, emit)
	_, err = stdcopy.StdCopy(out, errOut, rc)
	out.Close()
	errOut.Close()
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("reading the logs of container %s: %w", id, err)
	}
	return ctx.Err()
}

// lineWriter splits what is written into lines "TIMESTAMP text" and emits
// each; closing it flushes a last line without a newline.
func lineWriter(stream string, since time.Time, mu *sync.Mutex, emit func(LogLine)) io.WriteCloser {
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			stamp, text, _ := strings.Cut(sc.Text(), " ")
			at, err := time.Parse(time.RFC3339Nano, stamp)
			if err != nil {
				at, text = time.Time{}, sc.Text()
			}
			if text == holdingLine || (!since.IsZero() && !at.IsZero() && !at.After(since)) {
				continue
			}
			mu.Lock()
			emit(LogLine{Time: at, Stream: stream, Text: text})
			mu.Unlock()
		}
		pr.CloseWithError(sc.Err())
	}()
	return &closeWaiter{PipeWriter: pw, done: done}
}

// closeWaiter closes its pipe and waits for the reader to finish.
type closeWaiter struct {
	*io.PipeWriter
	done chan struct{}
}

func (c *closeWaiter) Close() error {
	err := c.PipeWriter.Close()
	<-c.done
	return err
}
