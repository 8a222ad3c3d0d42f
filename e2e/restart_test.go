package e2e

import (
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// TestLabDaemonRestart: droverd restarted (SIGTERM, then started again)
// on the host of a service, while clients on the two other hosts use the
// service at its IP. The containers keep running through the restart;
// what a restart takes away is the userspace WireGuard device, which the
// daemon carries. The restarted daemon brings its device back with the
// peers it kept (agent/mesh), before its facts and gossip are back, and
// handshakes them at once. Every write acknowledged is on the service's
// volume; the longest gap each client saw is reported (a figure, not a
// check: `make bench` measures it with production timing).
func TestLabDaemonRestart(t *testing.T) {
	h, daemons, ip := shopLab(t, "dr", 16)
	owner := daemons[1] // shop/web runs on the second host
	var probers []*prober
	var writers []*writer
	for _, host := range []*lab.Host{h[0], h[2]} {
		probers = append(probers, startProber(t, host, 20*time.Millisecond, ip+":80"))
		writers = append(writers, startWriter(host, ip, 100*time.Millisecond))
	}
	time.Sleep(2 * time.Second)
	began := time.Now()
	if err := owner.proc.Stop(30 * time.Second); err != nil {
		t.Fatalf("stopping droverd on %s: %v", h[1].Name, err)
	}
	stopped := time.Since(began)
	owner.start(t)
	testpoll.Until(t, 60*time.Second, "the restarted daemon back in the cluster, the service ready on it", func() error {
		ss, err := owner.ctl("service", "ls")
		if err != nil {
			return err
		}
		if !strings.Contains(ss, h[1].Name) || !strings.Contains(ss, "ready") {
			return fmt.Errorf("service ls on %s:\n%s", h[1].Name, ss)
		}
		return nil
	})
	time.Sleep(3 * time.Second)
	acked := map[string]string{}
	for i, w := range writers {
		got := w.Stop()
		if len(got) == 0 {
			t.Fatalf("the client on %s had no write acknowledged", []*lab.Host{h[0], h[2]}[i].Name)
		}
		maps.Copy(acked, got)
	}
	requireAcked(t, dataDir(h[1]), acked)
	var report []string
	for i, p := range probers {
		p.Stop()
		gap, err := p.longestGap()
		if err != nil {
			t.Fatalf("prober on %s: %v", []*lab.Host{h[0], h[2]}[i].Name, err)
		}
		report = append(report, fmt.Sprintf("client on %s: longest gap %s", []*lab.Host{h[0], h[2]}[i].Name, gap.Round(time.Millisecond)))
	}
	t.Logf("droverd on %s stopped in %s and started again; %d acknowledged writes kept; %s",
		h[1].Name, stopped.Round(time.Millisecond), len(acked), strings.Join(report, "; "))
}
