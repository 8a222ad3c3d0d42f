// Package lab builds drover's test lab: several real hosts on one machine
// (network namespaces on a bridge, each with its own ZFS pool and Docker
// engine), made and torn down by lab.sh. Tests use it to run the built
// binaries as separate machines.
package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Subnet is the lab's underlay: host i has Subnet.i; it matches lab.sh.
const Subnet = "10.77.0"

// Options choose what a lab has.
type Options struct {
	Hosts  int
	Prefix string // names hosts Prefix1..N; keep it short (device names)
	Docker bool   // start a Docker engine in every host
	ZFS    bool   // give every host a ZFS pool
}

// Lab is a set of hosts.
type Lab struct {
	Prefix string
	Dir    string // state dir of the lab
	Hosts  []*Host

	script string
	mu     sync.Mutex
	procs  []*Proc
}

// Host is one lab host.
type Host struct {
	Name       string // also its network namespace
	Index      int
	UnderlayIP string
	Dir        string // the host's state dir
	RunDir     string // the host's runtime dir (sockets)
	DockerSock string // empty without Docker
	Pool       string // empty without ZFS
	PoolMount  string
	lab        *Lab
}

// Script is the path of lab.sh.
func Script() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "lab.sh")
}

// New makes a lab and registers its teardown with t, which runs also when
// the test fails. It skips the test, saying why, when this machine cannot
// host a lab.
func New(t testing.TB, opts Options) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the lab needs root (network namespaces, ZFS pools, Docker engines)")
	}
	need := []string{"ip", "nsenter"}
	if opts.Docker {
		need = append(need, "dockerd", "docker")
	}
	if opts.ZFS {
		need = append(need, "zpool", "zfs")
	}
	for _, tool := range need {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("the lab needs %s: run `make deps`", tool)
		}
	}
	if opts.Prefix == "" {
		opts.Prefix = "dl"
	}
	l := &Lab{Prefix: opts.Prefix, Dir: "/var/lib/drover-lab/" + opts.Prefix, script: Script()}
	t.Cleanup(l.teardown)
	cmd := exec.Command(l.script, "up", fmt.Sprint(opts.Hosts), opts.Prefix)
	cmd.Env = append(os.Environ(), "LAB_DOCKER="+flag(opts.Docker), "LAB_ZFS="+flag(opts.ZFS))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("lab up: %v\n%s", err, out)
	}
	for i := 1; i <= opts.Hosts; i++ {
		name := fmt.Sprintf("%s%d", opts.Prefix, i)
		h := &Host{
			Name: name, Index: i, UnderlayIP: fmt.Sprintf("%s.%d", Subnet, i),
			Dir: filepath.Join(l.Dir, name), RunDir: filepath.Join("/run/drover-lab", opts.Prefix, name), lab: l,
		}
		if opts.Docker {
			h.DockerSock = filepath.Join(h.RunDir, "docker.sock")
		}
		if opts.ZFS {
			h.Pool, h.PoolMount = name+"pool", filepath.Join(l.Dir, "mnt", name)
		}
		l.Hosts = append(l.Hosts, h)
	}
	return l
}

func flag(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

func (l *Lab) teardown() {
	l.mu.Lock()
	procs := l.procs
	l.mu.Unlock()
	for _, p := range procs {
		p.Stop(10 * time.Second)
	}
	exec.Command(l.script, "down", l.Prefix).Run()
}

// Command runs argv inside the host's network namespace. nsenter, unlike
// `ip netns exec`, leaves /sys and the cgroup mounts as they are.
func (h *Host) Command(ctx context.Context, argv ...string) *exec.Cmd {
	args := append([]string{"--net=/var/run/netns/" + h.Name}, argv...)
	return exec.CommandContext(ctx, "nsenter", args...)
}

// Run runs argv in the host and returns its combined output.
func (h *Host) Run(ctx context.Context, argv ...string) (string, error) {
	out, err := h.Command(ctx, argv...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %s: %w: %s", h.Name, strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Proc is a long-running process in a host, its output in a log file.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// Start starts argv in the host; the lab's teardown stops it if the test
// did not.
func (h *Host) Start(name string, argv ...string) (*Proc, error) {
	logPath := filepath.Join(h.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	p := &Proc{Name: h.Name + "/" + name, cmd: h.Command(context.Background(), argv...), log: logPath, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: starting %s: %w", h.Name, name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		f.Close()
		close(p.done)
	}()
	h.lab.mu.Lock()
	h.lab.procs = append(h.lab.procs, p)
	h.lab.mu.Unlock()
	return p, nil
}

// LogPath is the file the process writes to.
func (p *Proc) LogPath() string { return p.log }

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Exited tells whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits for the process to end and returns how it ended.
func (p *Proc) Wait() error {
	<-p.done
	return p.err
}

// Stop sends SIGTERM, waits up to timeout, then kills.
func (p *Proc) Stop(timeout time.Duration) error {
	if p.Exited() {
		return nil
	}
	p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %v of SIGTERM", p.Name, timeout)
	}
}

// Kill sends SIGKILL and waits for the process to end.
func (p *Proc) Kill() error {
	if p.Exited() {
		return nil
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	<-p.done
	return nil
}

// SetLinkUp cuts a host off the bridge (false) or brings it back (true).
func (l *Lab) SetLinkUp(h *Host, up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	if out, err := exec.Command("ip", "link", "set", "v"+h.Name, state).CombinedOutput(); err != nil {
		return fmt.Errorf("link %s of %s: %w: %s", state, h.Name, err, out)
	}
	return nil
}

// Kill kills every process of a host at once, as a power cut would:
// droverd and the Docker engine in its namespace, and its containers.
// The network link stays as it is (SetLinkUp).
func (l *Lab) Kill(h *Host) error {
	if out, err := exec.Command(l.script, "kill", h.Name).CombinedOutput(); err != nil {
		return fmt.Errorf("killing %s: %w: %s", h.Name, err, out)
	}
	return nil
}

// StartDocker starts a host's Docker engine again (after Kill) and waits
// until it answers.
func (l *Lab) StartDocker(h *Host) error {
	if out, err := exec.Command(l.script, "docker-start", h.Name).CombinedOutput(); err != nil {
		return fmt.Errorf("starting the engine of %s: %w: %s", h.Name, err, out)
	}
	return nil
}

// PID is the process id (nsenter execs the command, so it is the command's).
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Lab is the lab the host belongs to.
func (h *Host) Lab() *Lab { return h.lab }
