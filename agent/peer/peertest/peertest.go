// Package peertest runs the daemon-to-daemon calls of several machines in
// one test process: each machine gets its own loopback address
// (127.0.0.N) with a real HTTP server on it, calls go out from that
// address, and the callee names the caller by it, as the mesh does with
// overlay addresses. Only tests import it.
package peertest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

// Net is a set of machines that can call each other.
type Net struct {
	t     testing.TB
	mu    sync.Mutex
	hosts map[string]*Host // by machine id
	byIP  map[netip.Addr]string
}

// New makes an empty net; its servers close when the test ends.
func New(t testing.TB) *Net {
	return &Net{t: t, hosts: map[string]*Host{}, byIP: map[netip.Addr]string{}}
}

// Host is one machine of the net: it is a peer.Mux, a peer.Caller and a
// peer.Identifier.
type Host struct {
	net    *Net
	ID     string
	IP     netip.Addr
	mux    *http.ServeMux
	srv    *httptest.Server
	client *http.Client
	down   bool
}

// Add makes a machine with the next loopback address.
func (n *Net) Add(id string) *Host {
	n.mu.Lock()
	ip := netip.AddrFrom4([4]byte{127, 0, 0, byte(len(n.hosts) + 10)})
	n.mu.Unlock()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		n.t.Fatalf("listening on %s: %v", ip, err)
	}
	h := &Host{net: n, ID: id, IP: ip, mux: http.NewServeMux()}
	h.srv = httptest.NewUnstartedServer(http.HandlerFunc(h.serve))
	h.srv.Listener.Close()
	h.srv.Listener = ln
	h.srv.Start()
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ip.AsSlice()}}
	h.client = &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	n.t.Cleanup(func() {
		h.client.CloseIdleConnections()
		h.srv.Close()
	})
	n.mu.Lock()
	n.hosts[id], n.byIP[ip] = h, id
	n.mu.Unlock()
	return h
}

func (h *Host) serve(w http.ResponseWriter, r *http.Request) {
	h.net.mu.Lock()
	down := h.down
	h.net.mu.Unlock()
	if down {
		// As a daemon that is gone: the connection just ends.
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return
			}
		}
	}
	h.mux.ServeHTTP(w, r)
}

// SetDown makes the machine answer nothing (its daemon is gone), or
// answer again.
func (h *Host) SetDown(down bool) {
	h.net.mu.Lock()
	h.down = down
	h.net.mu.Unlock()
}

// HandleRPC registers a handler as cluster.Node does.
func (h *Host) HandleRPC(pattern string, fn http.HandlerFunc) {
	method, path, _ := strings.Cut(pattern, " ")
	h.mux.HandleFunc(method+" /"+strings.TrimPrefix(path, "/"), fn)
}

// StatusError is an answer other than 200.
type StatusError struct {
	Code int
	Msg  []byte
}

func (e *StatusError) Error() string   { return fmt.Sprintf("status %d: %s", e.Code, e.Msg) }
func (e *StatusError) StatusCode() int { return e.Code }
func (e *StatusError) Body() []byte    { return e.Msg }

// CallRPC calls a handler of another machine from this machine's address.
func (h *Host) CallRPC(ctx context.Context, machineID, method, path string, header http.Header, body io.Reader) (*http.Response, error) {
	h.net.mu.Lock()
	to, ok := h.net.hosts[machineID]
	h.net.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("no RPC address known for machine %s", machineID)
	}
	req, err := http.NewRequestWithContext(ctx, method, to.srv.URL+"/"+strings.TrimPrefix(path, "/"), body)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, &StatusError{Code: resp.StatusCode, Msg: bytes.TrimSpace(msg)}
	}
	return resp, nil
}

// CallerOf names the machine of the address a request comes from.
func (h *Host) CallerOf(r *http.Request) (string, bool) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return "", false
	}
	h.net.mu.Lock()
	defer h.net.mu.Unlock()
	id, ok := h.net.byIP[ap.Addr().Unmap()]
	return id, ok
}

// Raw is an HTTP client from an address no machine of the net has: a
// process that is not a member.
func (n *Net) Raw() *http.Client {
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 250)}}
	c := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	n.t.Cleanup(c.CloseIdleConnections)
	return c
}

// URL is where a machine's handler of path is served.
func (h *Host) URL(path string) string { return h.srv.URL + "/" + strings.TrimPrefix(path, "/") }
