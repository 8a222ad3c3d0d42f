package dns

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// serve runs a server on a free loopback port and returns its address.
func serve(t *testing.T, facts Facts, cfg Config) string {
	t.Helper()
	l, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.LocalAddr().String()
	l.Close()
	cfg.Addr, cfg.Logger = addr, slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- New(cfg, facts).Run(ctx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("DNS server: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("DNS server ended: %v", err)
		}
	})
	return addr
}

func query(t *testing.T, net, addr, name string, qtype uint16) *mdns.Msg {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	r, _, err := (&mdns.Client{Net: net, Timeout: 2 * time.Second}).Exchange(m, addr)
	if err != nil {
		t.Fatalf("%s %s: %v", net, name, err)
	}
	return r
}

func TestServiceNamesAnswerWithTheServiceIP(t *testing.T) {
	facts := facttest.NewStore()
	facts.AddMachine(t, "a", "a")
	web := facts.Deploy(t, "shop", fsm.ServiceSpec{Name: "web", Image: "img"}, "a")
	addr := serve(t, facts, Config{})
	for _, net := range []string{"udp", "tcp"} {
		r := query(t, net, addr, "Web.SHOP.drover.", mdns.TypeA)
		if r.Rcode != mdns.RcodeSuccess || !r.Authoritative || len(r.Answer) != 1 {
			t.Fatalf("%s: %v", net, r)
		}
		if a := r.Answer[0].(*mdns.A); a.A.String() != web.ServiceIP.String() || a.Hdr.Ttl != TTL {
			t.Fatalf("%s: answer %v, want %s", net, a, web.ServiceIP)
		}
	}
	if r := query(t, "udp", addr, "web.shop.drover.", mdns.TypeAAAA); r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
		t.Fatalf("AAAA of a service: %v", r)
	}
	for _, name := range []string{"api.shop.drover.", "web.other.drover.", "x.web.shop.drover.", "drover."} {
		if r := query(t, "udp", addr, name, mdns.TypeA); r.Rcode != mdns.RcodeNameError || len(r.Ns) != 1 {
			t.Fatalf("%s: %v", name, r)
		}
	}
}

func TestOtherNamesAreForwardedForLocalClientsOnly(t *testing.T) {
	// An upstream that knows one name.
	up := &mdns.Server{Addr: "127.0.0.1:0", Net: "udp", Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(r)
		m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 7)}}
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	up.NotifyStartedFunc = func() { close(started) }
	go up.ListenAndServe()
	<-started
	t.Cleanup(func() { up.Shutdown() })
	upstream := up.PacketConn.LocalAddr().String()

	facts := facttest.NewStore()
	local := serve(t, facts, Config{Upstreams: []string{upstream}})
	if r := query(t, "udp", local, "example.org.", mdns.TypeA); r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("forwarded: %v", r)
	}
	// A client that is neither this host nor its containers is refused.
	remote := serve(t, facts, Config{Upstreams: []string{upstream}, LocalSource: func(netip.Addr) bool { return false }})
	if r := query(t, "udp", remote, "example.org.", mdns.TypeA); r.Rcode != mdns.RcodeRefused {
		t.Fatalf("a remote client's forward: %v", r)
	}
	// Malformed: two questions (the library refuses it before the handler).
	m := new(mdns.Msg)
	m.SetQuestion("web.shop.drover.", mdns.TypeA)
	m.Question = append(m.Question, m.Question[0])
	r, _, err := (&mdns.Client{Timeout: 2 * time.Second}).Exchange(m, local)
	if err != nil || r.Rcode != mdns.RcodeFormatError || len(r.Answer) != 0 {
		t.Fatalf("two questions: %v %v", r, err)
	}
}

func TestUpstreamsComeFromResolvConfWithoutDrover(t *testing.T) {
	f := t.TempDir() + "/resolv.conf"
	if err := writeFile(f, "search lan\nnameserver 169.254.77.53\nnameserver 10.0.0.2\n# nameserver 1.1.1.1\nnameserver ::1\n"); err != nil {
		t.Fatal(err)
	}
	got := Upstreams(f, netip.MustParseAddr("169.254.77.53"))
	if len(got) != 2 || got[0] != "10.0.0.2:53" || got[1] != "[::1]:53" {
		t.Fatalf("upstreams %v", got)
	}
}

func writeFile(path, text string) error { return os.WriteFile(path, []byte(text), 0o644) }
