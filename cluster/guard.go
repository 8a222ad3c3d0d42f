package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/raft"
)

// Who may reach Raft and the RPC server (see DESIGN.md, "Who reaches the
// overlay ports"). With Config.Device set, both listen on the overlay
// address bound to the WireGuard device (SO_BINDTODEVICE), so a packet
// that arrives on any other interface — an underlay neighbour that routes
// the overlay range to this host — finds no socket. A connection from
// this host itself arrives over the loopback with a local source address:
// it is refused on accept. What is left is a peer of the mesh, whose
// source address WireGuard authenticated; handlers name it by that
// address. This machine's calls to itself never leave the process.

// listenBound listens on addr; with device set, bound to that device and
// refusing connections from this host's own addresses.
func listenBound(addr netip.AddrPort, device, what string, logger *slog.Logger) (net.Listener, error) {
	if device == "" {
		return net.Listen("tcp", addr.String())
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptString(int(fd), syscall.SOL_SOCKET, syscall.SO_BINDTODEVICE, device)
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("binding the %s listener to %s: %w", what, device, serr)
		}
		return nil
	}}
	ln, err := lc.Listen(context.Background(), "tcp", addr.String())
	if err != nil {
		return nil, err
	}
	return &memberListener{Listener: ln, what: what, logger: logger}, nil
}

// memberListener drops connections whose source is an address of this
// host: a local process, not a peer of the mesh.
type memberListener struct {
	net.Listener
	what   string
	logger *slog.Logger
}

func (l *memberListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
		if err == nil && !isLocalAddr(ap.Addr().Unmap()) {
			return c, nil
		}
		l.logger.Warn("refused a connection from this host to the "+l.what+" port: only peers of the mesh may connect",
			"from", c.RemoteAddr().String())
		c.Close()
	}
}

// isLocalAddr tells whether ip is an address of this host (in this
// network namespace).
func isLocalAddr(ip netip.Addr) bool {
	if ip.IsLoopback() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true // unknown: refuse
	}
	for _, a := range addrs {
		if pfx, err := netip.ParsePrefix(a.String()); err == nil && pfx.Addr().Unmap() == ip {
			return true
		}
	}
	return false
}

// raftStream is Raft's network layer on a guarded listener.
type raftStream struct {
	net.Listener
	advertise net.Addr
	source    net.Addr // this machine's overlay address; nil: the kernel's choice
}

func (s *raftStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	if s.source != nil {
		d.LocalAddr = s.source
	}
	return d.Dial("tcp", string(addr))
}

func (s *raftStream) Addr() net.Addr { return s.advertise }

// pipeListener hands the RPC server the in-process connections of this
// machine's calls to itself.
type pipeListener struct {
	conns  chan net.Conn
	done   chan struct{}
	closed sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

var errPipeClosed = errors.New("in-process RPC listener closed")

func (p *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-p.conns:
		return c, nil
	case <-p.done:
		return nil, errPipeClosed
	}
}

func (p *pipeListener) Close() error {
	p.closed.Do(func() { close(p.done) })
	return nil
}

func (p *pipeListener) Addr() net.Addr { return pipeAddr{} }

// dial is the self client's dialer.
func (p *pipeListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case p.conns <- &selfConn{server}:
		return client, nil
	case <-p.done:
		return nil, errPipeClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "self" }

// selfConn marks a connection of this machine's calls to itself.
type selfConn struct{ net.Conn }

type selfKey struct{}
