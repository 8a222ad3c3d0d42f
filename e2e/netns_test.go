package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/drover-sh/drover/lab"
)

// inNetns runs fn on an OS thread moved into the host's network
// namespace, so the sockets fn creates belong to that host. The thread is
// never handed back to the scheduler: it ends with its goroutine. It is
// never the main thread.
// Goroutines fn starts run elsewhere; sockets made here may be used from
// anywhere.
func inNetns(h *lab.Host, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// The main thread: moving it would move the whole process as
			// `ip netns pids` sees it, and Go never ends it. Keep it locked
			// here, so the work goes to another thread, and hand it back.
			errc <- inNetns(h, fn)
			runtime.UnlockOSThread()
			return
		}
		// No Unlock from here: the thread dies with the goroutine.
		f, err := os.Open("/var/run/netns/" + h.Name)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering the network namespace of %s: %w", h.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// httpAnswers reports whether GET path on addr answers 200 within
// timeout, on a new connection made on the calling thread.
func httpAnswers(addr, path string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: probe\r\n\r\n", path); err != nil {
		return false
	}
	status, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(status, "HTTP/1.") && strings.Contains(status, " 200 ")
}

// prober asks a service for /healthz every interval from one lab host and
// keeps the time of every answer; the longest gap between answers is the
// downtime a client saw. It tries each address (the service may answer at
// any of them) until one answers.
type prober struct {
	stop     chan struct{}
	done     chan error
	stopOnce sync.Once
	err      error
	answers  []time.Time
	probes   int
}

// probeTimeout bounds one probe: a gap is measured to within it.
const probeTimeout = 100 * time.Millisecond

// startProber starts probing; the prober stops at the end of the
// benchmark at the latest.
func startProber(b testing.TB, from *lab.Host, every time.Duration, addrs ...string) *prober {
	p := &prober{stop: make(chan struct{}), done: make(chan error, 1)}
	b.Cleanup(func() { p.Stop() })
	go func() {
		p.done <- inNetns(from, func() error {
			tick := time.NewTicker(every)
			defer tick.Stop()
			good := 0
			for {
				select {
				case <-p.stop:
					return nil
				case <-tick.C:
				}
				p.probes++
				for i := range addrs {
					a := (good + i) % len(addrs)
					if httpAnswers(addrs[a], "/healthz", probeTimeout) {
						p.answers = append(p.answers, time.Now())
						good = a
						break
					}
				}
			}
		})
	}()
	return p
}

// Stop ends the prober; its answers are readable after. Calling it again
// does nothing.
func (p *prober) Stop() error {
	p.stopOnce.Do(func() {
		close(p.stop)
		p.err = <-p.done
	})
	return p.err
}

// longestGap is the longest time between two answers; with fewer than
// two answers it is an error.
func (p *prober) longestGap() (time.Duration, error) {
	if len(p.answers) < 2 {
		return 0, fmt.Errorf("%d answers to %d probes: the service never answered steadily", len(p.answers), p.probes)
	}
	var gap time.Duration
	for i := 1; i < len(p.answers); i++ {
		gap = max(gap, p.answers[i].Sub(p.answers[i-1]))
	}
	return gap, nil
}

// sendBetweenHosts is the way stop-copy-start tools move a volume: a full
// `zfs send` of snapshot on host from, over a plain TCP connection across
// the lab network, into `zfs receive` of dataset on host to. It returns
// the bytes of the stream.
func sendBetweenHosts(ctx context.Context, from, to *lab.Host, snapshot, dataset string) (int64, error) {
	var ln net.Listener
	if err := inNetns(to, func() (err error) {
		ln, err = net.Listen("tcp", to.UnderlayIP+":0")
		return err
	}); err != nil {
		return 0, fmt.Errorf("listening on %s: %w", to.Name, err)
	}
	defer ln.Close()

	var wg sync.WaitGroup
	var recvErr error
	wg.Go(func() {
		conn, err := ln.Accept()
		if err != nil {
			recvErr = err
			return
		}
		defer conn.Close()
		recv := exec.CommandContext(ctx, "zfs", "receive", dataset)
		recv.Stdin = conn
		if out, err := recv.CombinedOutput(); err != nil {
			recvErr = fmt.Errorf("zfs receive %s on %s: %w: %s", dataset, to.Name, err, out)
		}
	})

	var conn net.Conn
	err := inNetns(from, func() (err error) {
		conn, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		return err
	})
	if err != nil {
		ln.Close()
		wg.Wait()
		return 0, fmt.Errorf("connecting %s to %s: %w", from.Name, to.Name, err)
	}
	send := exec.CommandContext(ctx, "zfs", "send", snapshot)
	var stderr strings.Builder
	send.Stderr = &stderr
	stream, err := send.StdoutPipe()
	if err == nil {
		err = send.Start()
	}
	var n int64
	if err == nil {
		n, err = io.Copy(conn, stream)
		if werr := send.Wait(); err == nil && werr != nil {
			err = fmt.Errorf("zfs send %s on %s: %w: %s", snapshot, from.Name, werr, stderr.String())
		}
	}
	conn.Close()
	wg.Wait()
	return n, errors.Join(err, recvErr)
}
