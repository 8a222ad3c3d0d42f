package cluster

import (
	"bytes"
	"net/netip"
	"strings"

	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/drover-sh/drover/fsm"
	"io"
	"net"
	"net/http"
	"time"
)

// The daemon-to-daemon RPC: HTTP on the RPC port of the overlay address.
// Every request carries a token derived from the cluster key, so a
// process that can reach the port but does not hold the key is refused
// even before the mesh authenticates peers.
const (
	rpcApplyPath  = "/rpc/v1/apply"
	rpcStatsPath  = "/rpc/v1/stats"
	rpcRemovePath = "/rpc/v1/remove-server"
	rpcAuthHdr    = "Drover-Cluster-Auth"
	maxRPCBody    = 1 << 20
)

// errRemoteNotLeader is the answer of a machine that lost leadership
// between our lookup and its apply; the command was not applied.
var errRemoteNotLeader = errors.New("remote machine is not the leader")

func rpcToken(key []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte("drover rpc v1"))
	return hex.EncodeToString(mac.Sum(nil))
}

// serverStats is what autopilot needs from every server, and what a
// follower catching up asks the leader.
type serverStats struct {
	LastContact time.Duration `json:"last_contact_ns"`
	LastTerm    uint64        `json:"last_term"`
	LastIndex   uint64        `json:"last_index"`
	// FactsIndex is the index of the last entry the fact store applied
	// (0 from daemons before it existed, and before the first command).
	FactsIndex uint64 `json:"facts_index,omitempty"`
}

func (n *Node) rpcHandler() http.Handler {
	mux := n.rpcMux
	mux.HandleFunc("POST "+rpcApplyPath, n.handleApply)
	mux.HandleFunc("GET "+rpcStatsPath, n.handleStats)
	mux.HandleFunc("POST "+rpcRemovePath, n.handleRemoveServer)
	mux.HandleFunc("GET "+rpcFollowPath, n.handleFollow)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !n.validToken(r.Header.Get(rpcAuthHdr)) {
			http.Error(w, "cluster key required", http.StatusUnauthorized)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// validToken tells whether tok derives from a gossip key this machine
// has installed: during a key rotation, callers may still sign with the
// old key or already with the new one.
func (n *Node) validToken(tok string) bool {
	for _, k := range n.gossip.keys() {
		if hmac.Equal([]byte(tok), []byte(rpcToken(k))) {
			return true
		}
	}
	return false
}

// token is what this machine's calls carry: derived from its primary key.
func (n *Node) token() string { return rpcToken(n.gossip.keys()[0]) }

func (n *Node) handleApply(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(io.LimitReader(r.Body, maxRPCBody+1))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if len(data) > maxRPCBody {
		// Never apply a command cut at the limit.
		http.Error(w, fmt.Sprintf("command over the %d KiB a forwarded command may have", maxRPCBody>>10), http.StatusRequestEntityTooLarge)
		return
	}
	res, err := n.applyLocal(r.Context(), data)
	if leaderRPCFailed(w, err) {
		return
	}
	n.announce() // the follower that forwarded it waits to see it applied
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(res)
}

// leaderRPCFailed answers a request only the leader can serve that failed:
// 421 when this machine is not the leader (the caller may look again),
// 503 otherwise. It reports whether err was an error.
func leaderRPCFailed(w http.ResponseWriter, err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, ErrNotLeader):
		http.Error(w, err.Error(), http.StatusMisdirectedRequest)
	default:
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
	}
	return true
}

func (n *Node) handleRemoveServer(w http.ResponseWriter, r *http.Request) {
	id, err := io.ReadAll(io.LimitReader(r.Body, 256))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if leaderRPCFailed(w, n.removeServerLocal(string(id))) {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte("{}"))
}

func (n *Node) handleStats(w http.ResponseWriter, _ *http.Request) {
	n.announce() // a follower asking is about to wait for these facts
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(n.localStats())
}

// rpcClient has no overall timeout (volume streams run long); every call
// carries a context.
type rpcClient struct {
	token func() string
	http  *http.Client // the fact store's calls (apply, stats): pooled
	// agent carries the agent's calls on a fresh connection each: they
	// are few, and a pooled connection to a daemon that restarted since
	// breaks a call whose body cannot be sent again (a volume stream).
	agent *http.Client
}

// newRPCClient makes the client of daemon-to-daemon calls; source gives
// the local address to call from (nil: the kernel's choice).
func newRPCClient(token func() string, source func() net.Addr) *rpcClient {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := &net.Dialer{Timeout: 3 * time.Second}
		if a := source(); a != nil {
			d.LocalAddr = a
		}
		return d.DialContext(ctx, network, addr)
	}
	pooled := &http.Transport{DialContext: dial, MaxIdleConnsPerHost: 4, IdleConnTimeout: 30 * time.Second}
	fresh := &http.Transport{DialContext: dial, DisableKeepAlives: true}
	return &rpcClient{token: token, http: &http.Client{Transport: pooled}, agent: &http.Client{Transport: fresh}}
}

func (c *rpcClient) do(ctx context.Context, method, addr, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set(rpcAuthHdr, c.token())
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("rpc %s %s: %w", method, addr, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxRPCBody))
	if err != nil {
		return fmt.Errorf("rpc %s %s: reading answer: %w", method, addr, err)
	}
	switch {
	case resp.StatusCode == http.StatusMisdirectedRequest:
		return fmt.Errorf("rpc %s: %w", addr, errRemoteNotLeader)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("rpc %s %s: %s: %s", method, addr, resp.Status, bytes.TrimSpace(raw))
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("rpc %s %s: decoding answer: %w", method, addr, err)
	}
	return nil
}

func (c *rpcClient) apply(ctx context.Context, addr string, data []byte) (applyResult, error) {
	var res applyResult
	err := c.do(ctx, http.MethodPost, addr, rpcApplyPath, data, &res)
	return res, err
}

func (c *rpcClient) stats(ctx context.Context, addr string) (serverStats, error) {
	var st serverStats
	err := c.do(ctx, http.MethodGet, addr, rpcStatsPath, nil, &st)
	return st, err
}

// stream opens a long answer (the facts stream) on a connection of its
// own; a status other than 200 is an error.
func (c *rpcClient) stream(ctx context.Context, addr, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set(rpcAuthHdr, c.token())
	resp, err := c.agent.Do(req)
	if err != nil {
		return nil, fmt.Errorf("rpc GET %s: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxRPCErrorBody))
		return nil, fmt.Errorf("rpc GET %s%s: %s: %s", addr, path, resp.Status, bytes.TrimSpace(msg))
	}
	return resp, nil
}

func (c *rpcClient) close() {
	c.http.CloseIdleConnections()
	c.agent.CloseIdleConnections()
}

// AgentRPCPrefix is where the agent's own daemon-to-daemon handlers live.
const AgentRPCPrefix = "/rpc/v1/agent/"

// HandleRPC registers a daemon-to-daemon handler under AgentRPCPrefix;
// call it before StartRaft. Requests reach it only with the cluster key,
// and only over the overlay.
func (n *Node) HandleRPC(pattern string, h http.HandlerFunc) {
	method, path, _ := strings.Cut(pattern, " ")
	n.rpcMux.HandleFunc(method+" "+AgentRPCPrefix+strings.TrimPrefix(path, "/"), h)
}

// CallRPC sends a request to an agent handler of another machine and
// returns the response for the caller to read (and close); a status other
// than 200 is an *RPCStatusError carrying the start of the body.
func (n *Node) CallRPC(ctx context.Context, machineID, method, path string, header http.Header, body io.Reader) (*http.Response, error) {
	client, base := n.rpc.agent, ""
	if np := n.net.Load(); np != nil && machineID == n.cfg.MachineID {
		client, base = np.self, "self" // never over the network: see guard.go
	} else if base = n.rpcAddrOf(machineID); base == "" {
		return nil, fmt.Errorf("no RPC address known for machine %s", machineID)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+base+AgentRPCPrefix+strings.TrimPrefix(path, "/"), body)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set(rpcAuthHdr, n.token())
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("rpc %s %s on %s: %w", method, path, base, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, maxRPCErrorBody))
		return nil, &RPCStatusError{Method: method, Path: path, Addr: base, Status: resp.Status, Code: resp.StatusCode, Msg: bytes.TrimSpace(msg)}
	}
	return resp, nil
}

// CallerOf names the machine an agent handler's request comes from: this
// machine for its calls to itself, else the machine whose overlay (or
// RPC) address the connection comes from.
func (n *Node) CallerOf(r *http.Request) (string, bool) {
	if self, _ := r.Context().Value(selfKey{}).(bool); self {
		return n.cfg.MachineID, true
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return "", false
	}
	return n.MachineByAddr(ap.Addr().Unmap())
}

// maxRPCErrorBody bounds what is read of an error answer.
const maxRPCErrorBody = 64 << 10

// RPCStatusError is an agent handler's answer other than 200.
type RPCStatusError struct {
	Method, Path, Addr string
	Status             string // "409 Conflict"
	Code               int
	Msg                []byte
}

func (e *RPCStatusError) Error() string {
	return fmt.Sprintf("rpc %s %s on %s: %s: %s", e.Method, e.Path, e.Addr, e.Status, e.Msg)
}

// StatusCode is the answer's HTTP status.
func (e *RPCStatusError) StatusCode() int { return e.Code }

// Body is the start of the answer's body.
func (e *RPCStatusError) Body() []byte { return e.Msg }

// MachineByAddr names the machine whose overlay (or RPC) address is ip:
// how an agent handler knows which machine calls it. Over the mesh the
// source address is authenticated by WireGuard.
func (n *Node) MachineByAddr(ip netip.Addr) (string, bool) {
	var id string
	n.facts.read(func(s *fsm.State) {
		for _, m := range s.Machines() {
			if m.OverlayIP == ip {
				id = m.ID
				return
			}
			if ap, err := netip.ParseAddrPort(m.RPCAddr); err == nil && ap.Addr() == ip {
				id = m.ID
			}
		}
	})
	return id, id != ""
}
