// Package dns answers names of services, SERVICE.NAMESPACE.drover, with
// their service IPs from this machine's facts, for the host and for the
// containers the engine points at it; other names it forwards to the
// host's resolvers for local clients only. See DESIGN.md.
package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/drover-sh/drover/fsm"
)

// Zone is the domain drover answers for.
const Zone = "drover."

// TTL of an answer: short, though a service IP never changes while the
// service exists.
const TTL = 5

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
}

// Config is where the server listens and whom it asks for other names.
type Config struct {
	Addr string // host:port, UDP and TCP
	// Upstreams are resolvers (host:port) for names outside Zone;
	// none: such names are refused.
	Upstreams []string
	// LocalSource tells whether a client may have other names forwarded
	// (the host and its containers, not the network); nil: loopback only.
	LocalSource func(netip.Addr) bool
	Logger      *slog.Logger
}

// Server answers DNS.
type Server struct {
	cfg   Config
	facts Facts
	udp   *mdns.Server
	tcp   *mdns.Server
	fwd   *mdns.Client
}

// New makes a server; Run serves.
func New(cfg Config, facts Facts) *Server {
	if cfg.LocalSource == nil {
		cfg.LocalSource = netip.Addr.IsLoopback
	}
	s := &Server{cfg: cfg, facts: facts, fwd: &mdns.Client{Timeout: 2 * time.Second}}
	return s
}

// Run serves UDP and TCP on cfg.Addr until ctx ends; it returns once the
// listeners are closed. ready, when given, is called once both listen.
func (s *Server) Run(ctx context.Context, ready func()) error {
	pc, err := net.ListenPacket("udp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("DNS on %s (udp): %w", s.cfg.Addr, err)
	}
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		pc.Close()
		return fmt.Errorf("DNS on %s (tcp): %w", s.cfg.Addr, err)
	}
	s.udp = &mdns.Server{PacketConn: pc, Handler: s}
	s.tcp = &mdns.Server{Listener: ln, Handler: s, ReadTimeout: 5 * time.Second}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	started := make(chan struct{}, 2)
	for i, srv := range []*mdns.Server{s.udp, s.tcp} {
		srv.NotifyStartedFunc = func() { started <- struct{}{} }
		wg.Go(func() { errs[i] = srv.ActivateAndServe() })
	}
	for range 2 {
		select {
		case <-started:
		case <-ctx.Done():
		}
	}
	if ready != nil && ctx.Err() == nil {
		ready()
	}
	<-ctx.Done()
	s.udp.Shutdown()
	s.tcp.Shutdown()
	wg.Wait()
	return errors.Join(errs...)
}

// ServeDNS answers one query.
func (s *Server) ServeDNS(w mdns.ResponseWriter, req *mdns.Msg) {
	resp := s.answer(req, sourceOf(w.RemoteAddr()))
	if err := w.WriteMsg(resp); err != nil {
		s.cfg.Logger.Debug("writing a DNS answer", "err", err)
	}
}

func sourceOf(a net.Addr) netip.Addr {
	switch v := a.(type) {
	case *net.UDPAddr:
		ip, _ := netip.AddrFromSlice(v.IP)
		return ip.Unmap()
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(v.IP)
		return ip.Unmap()
	}
	return netip.Addr{}
}

// answer decides the reply to req from a client at src.
func (s *Server) answer(req *mdns.Msg, src netip.Addr) *mdns.Msg {
	resp := new(mdns.Msg)
	if req.Opcode != mdns.OpcodeQuery || len(req.Question) != 1 {
		resp.SetRcode(req, mdns.RcodeNotImplemented)
		return resp
	}
	q := req.Question[0]
	name := strings.ToLower(mdns.Fqdn(q.Name))
	if name != Zone && !strings.HasSuffix(name, "."+Zone) {
		return s.forward(req, src)
	}
	resp.SetReply(req)
	resp.Authoritative = true
	ip, found := s.lookup(strings.TrimSuffix(name, "."+Zone))
	switch {
	case !found:
		resp.Rcode = mdns.RcodeNameError
		resp.Ns = []mdns.RR{s.soa()}
	case q.Qclass == mdns.ClassINET && (q.Qtype == mdns.TypeA || q.Qtype == mdns.TypeANY):
		resp.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: TTL}, A: ip.AsSlice()}}
	default:
		resp.Ns = []mdns.RR{s.soa()} // the name is, with no data of that type
	}
	return resp
}

// lookup finds the service of "SERVICE.NAMESPACE".
func (s *Server) lookup(rel string) (netip.Addr, bool) {
	svc, ns, ok := strings.Cut(rel, ".")
	if !ok || strings.Contains(ns, ".") {
		return netip.Addr{}, false
	}
	var ip netip.Addr
	var found bool
	s.facts.Read(func(st *fsm.State) {
		if sv, ok := st.Service(ns, svc); ok {
			ip, found = sv.ServiceIP, true
		}
	})
	return ip, found
}

func (s *Server) soa() mdns.RR {
	return &mdns.SOA{Hdr: mdns.RR_Header{Name: Zone, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: TTL},
		Ns: "ns." + Zone, Mbox: "hostmaster." + Zone, Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: TTL}
}

// forward asks the upstreams for a name outside the zone, for local
// clients only: an open resolver answers anyone's queries.
func (s *Server) forward(req *mdns.Msg, src netip.Addr) *mdns.Msg {
	resp := new(mdns.Msg)
	if !s.cfg.LocalSource(src) {
		resp.SetRcode(req, mdns.RcodeRefused)
		return resp
	}
	if len(s.cfg.Upstreams) == 0 {
		resp.SetRcode(req, mdns.RcodeServerFailure)
		return resp
	}
	var lastErr error
	for _, up := range s.cfg.Upstreams {
		r, _, err := s.fwd.Exchange(req, up)
		if err == nil {
			return r
		}
		lastErr = err
	}
	s.cfg.Logger.Debug("forwarding a DNS query", "name", req.Question[0].Name, "err", lastErr)
	resp.SetRcode(req, mdns.RcodeServerFailure)
	return resp
}

// Upstreams reads the nameservers of a resolv.conf, leaving out skip
// (drover's own address).
func Upstreams(resolvConf string, skip netip.Addr) []string {
	b, err := os.ReadFile(resolvConf)
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		ip, err := netip.ParseAddr(fields[1])
		if err != nil || ip == skip {
			continue
		}
		out = append(out, net.JoinHostPort(ip.String(), "53"))
	}
	return out
}

// ContainerSource tells whether src is this host or one of its
// containers: loopback, or within the prefix of a local bridge (docker0,
// br-*). It reads the interfaces at most every few seconds.
func ContainerSource() func(netip.Addr) bool {
	var mu sync.Mutex
	var prefixes []netip.Prefix
	var readAt time.Time
	return func(src netip.Addr) bool {
		if src.IsLoopback() {
			return true
		}
		mu.Lock()
		defer mu.Unlock()
		if time.Since(readAt) > 5*time.Second {
			prefixes, readAt = bridgePrefixes(), time.Now()
		}
		for _, p := range prefixes {
			if p.Contains(src) {
				return true
			}
		}
		return false
	}
}

func bridgePrefixes() []netip.Prefix {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var out []netip.Prefix
	for _, ifc := range ifs {
		if ifc.Name != "docker0" && !strings.HasPrefix(ifc.Name, "br-") {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if p, err := netip.ParsePrefix(n.String()); err == nil {
					out = append(out, p.Masked())
				}
			}
		}
	}
	return out
}
