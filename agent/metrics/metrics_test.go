package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/netmesh"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

type fakeMembers []cluster.Member

func (f fakeMembers) Members() []cluster.Member { return f }

type fakeMesh netmesh.Status

func (f fakeMesh) Status() (netmesh.Status, error) { return netmesh.Status(f), nil }

func TestMetricsCountWhatThePartsReportAndLint(t *testing.T) {
	m := New()
	members := fakeMembers{
		{Meta: cluster.Meta{Name: "a", WGPublicKey: "ka"}, Liveness: cluster.LivenessAlive},
		{Meta: cluster.Meta{Name: "b", WGPublicKey: "kb"}, Liveness: cluster.LivenessAlive},
		{Meta: cluster.Meta{Name: "c", WGPublicKey: "kc"}, Liveness: cluster.LivenessFailed},
	}
	mesh := fakeMesh{Peers: []netmesh.PeerStatus{{PublicKey: "kb", LastHandshake: time.Now().Add(-30 * time.Second), RxBytes: 100, TxBytes: 200}}}
	m.Watch(func() (Members, Mesh) { return members, mesh })

	m.Committed(3 * time.Millisecond)
	m.LeaderChanged()
	m.MigrationEnded("done", 10*time.Second, 300*time.Millisecond, 1<<20)
	m.MigrationEnded("aborted", 2*time.Second, 0, 100)
	m.DrainEnded("drained")
	m.ReconcileAction("start")
	m.ReconcileError()

	if got := testutil.ToFloat64(m.migrations.WithLabelValues("done")); got != 1 {
		t.Fatalf("migrations done %v", got)
	}
	if got := testutil.ToFloat64(m.migBytes); got != 1<<20+100 {
		t.Fatalf("bytes sent %v", got)
	}
	if n := testutil.CollectAndCount(m.migDowntime); n != 1 {
		t.Fatalf("downtime histogram: %d series", n)
	}
	problems, err := testutil.GatherAndLint(m.reg)
	if err != nil || len(problems) != 0 {
		t.Fatalf("lint: %v %+v", err, problems)
	}
	want := `
# HELP drover_gossip_members Machines gossip sees, by liveness.
# TYPE drover_gossip_members gauge
drover_gossip_members{state="alive"} 2
drover_gossip_members{state="failed"} 1
drover_gossip_members{state="left"} 0
drover_gossip_members{state="suspect"} 0
# HELP drover_wireguard_received_bytes_total Bytes received from each WireGuard peer.
# TYPE drover_wireguard_received_bytes_total counter
drover_wireguard_received_bytes_total{peer="b"} 100
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "drover_gossip_members", "drover_wireguard_received_bytes_total"); err != nil {
		t.Fatal(err)
	}
	// No cluster yet: the scrape still answers, with no peers.
	idle := New()
	idle.Watch(func() (Members, Mesh) { return nil, nil })
	if problems, err := testutil.GatherAndLint(idle.reg); err != nil || len(problems) != 0 {
		t.Fatalf("lint without a cluster: %v %+v", err, problems)
	}
}
