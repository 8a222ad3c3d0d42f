package migrate

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

// machine is one machine of a test cluster: its migrator, and the fakes
// of its pool, engine and loopback.
type machine struct {
	id   string
	host *peertest.Host
	vols *fakeVolumes
	rt   *fakeRuntime
	lo   *fakeLoopback
	mig  *Migrator
}

// testCluster is machines that share one fact store in memory and call
// each other over loopback addresses; gossip sees every one alive.
type testCluster struct {
	t       *testing.T
	facts   *facttest.Store
	members *facttest.Members
	net     *peertest.Net
	m       map[string]*machine
}

const testImage = "img:1"

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newCluster makes machines named as given (the id is the name).
func newCluster(t *testing.T, names ...string) *testCluster {
	c := &testCluster{t: t, facts: facttest.NewStore(), members: facttest.NewMembers(), net: peertest.New(t), m: map[string]*machine{}}
	for _, name := range names {
		c.facts.AddMachine(t, name, name)
		c.members.Set(name, name, "alive")
	}
	for _, name := range names {
		h := c.net.Add(name)
		mc := &machine{id: name, host: h, vols: newFakeVolumes("pool-" + name + "/drover"), rt: newFakeRuntime(testImage), lo: &fakeLoopback{}}
		ctx, cancel := context.WithCancel(context.Background())
		mc.mig = New(ctx, Config{Self: name, Name: name, LockLease: time.Minute, StallTimeout: 400 * time.Millisecond,
			SafetyWindow: time.Hour, JanitorInterval: 20 * time.Millisecond, Logger: quiet(), MemAvailable: func() uint64 { return 2 << 30 }},
			Deps{Facts: c.facts, Members: c.members, Peers: h, Server: peer.Server{Mux: h, IDs: h},
				Streams: mc.vols, Datasets: mc.vols, Copies: mc.vols, Containers: mc.rt, Starter: mc.rt, Images: mc.rt, Loopback: mc.lo, Holder: mc.rt})
		mc.mig.lookupWait = 300 * time.Millisecond
		mc.mig.Register()
		t.Cleanup(func() {
			cancel()
			mc.mig.Wait()
		})
		c.m[name] = mc
	}
	return c
}

// webSpec is a service with one volume.
func webSpec() fsm.ServiceSpec {
	return fsm.ServiceSpec{Name: "web", Image: testImage, MemoryBytes: 64 << 20,
		Volumes: []fsm.VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 30}}}
}

// deploy runs shop/web on machine on: facts, dataset with a snapshot a
// user took, and a running container.
func (c *testCluster) deploy(on string) fsm.Service {
	sv := c.facts.Deploy(c.t, "shop", webSpec(), on)
	m := c.m[on]
	m.vols.create(m.vols.Dataset("shop", "data"), "user-snap")
	if _, err := m.rt.Start(context.Background(), runtimeSpec(sv)); err != nil {
		c.t.Fatal(err)
	}
	m.lo.Add(sv.ServiceIP)
	return sv
}

func (c *testCluster) service() fsm.Service {
	var sv fsm.Service
	c.facts.Read(func(s *fsm.State) { sv, _ = s.Service("shop", "web") })
	return sv
}

func (c *testCluster) migration(id string) fsm.Migration {
	var m fsm.Migration
	c.facts.Read(func(s *fsm.State) { m, _ = s.Migration(id) })
	return m
}

func (c *testCluster) owner() string {
	var owner string
	c.facts.Read(func(s *fsm.State) {
		v, _ := s.Volume("shop", "data")
		owner = v.OwnerID
	})
	return owner
}

func (c *testCluster) lockHolder() string {
	var holder string
	c.facts.Read(func(s *fsm.State) {
		if l, ok := s.Lock("shop"); ok {
			holder = l.Holder
		}
	})
	return holder
}

// orphan records a migration of shop/web to target held by holder, moved
// through the facts up to phase as if an executor had driven it and died,
// with the machines' pools and engines as that executor left them.
func (c *testCluster) orphan(id, target, holder string, phase fsm.MigrationPhase) fsm.Migration {
	t := c.t
	sv := c.service()
	src, tgt := c.m[sv.MachineID], c.m[target]
	c.facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: holder, Lease: time.Minute, At: time.Now()})
	c.facts.Must(t, fsm.StartMigration{ID: id, Namespace: "shop", Service: "web", TargetID: target, Holder: holder,
		Volumes: []fsm.MigrationVolume{{Name: "data"}}, At: time.Now()})
	order := []fsm.MigrationPhase{fsm.PhaseWarmCopy, fsm.PhaseSourceStopped, fsm.PhaseFinalCopy, fsm.PhaseTargetStarting}
	staging := tgt.vols.StagingDataset(id, "data")
	for _, p := range order {
		if phase == fsm.PhasePlanned {
			break
		}
		c.facts.Must(t, fsm.AdvanceMigration{ID: id, Phase: p, At: time.Now()})
		switch p {
		case fsm.PhaseWarmCopy:
			tgt.vols.create(staging, "user-snap", "drover-"+id+"-1")
		case fsm.PhaseSourceStopped:
			ctr, _ := src.rt.container("shop", "web")
			src.rt.Stop(context.Background(), ctr.ID, 0)
		case fsm.PhaseTargetStarting:
			if _, err := tgt.vols.Adopt(staging, "shop", "data"); err != nil {
				t.Fatal(err)
			}
			tgt.vols.SetOrigin("shop", "data", id)
			tgt.rt.Start(context.Background(), runtimeSpec(sv))
			tgt.lo.Add(sv.ServiceIP)
		}
		if p == phase {
			break
		}
	}
	if phase == fsm.PhaseCommitted {
		c.facts.Must(t, fsm.CommitMigration{ID: id, Holder: holder, ReadyAt: time.Now(), At: time.Now()})
	}
	return c.migration(id)
}

func runtimeSpec(sv fsm.Service) runtime.RunSpec {
	return runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP}
}

func migrateTo(machine string) ctlapi.MigrateRequest {
	return ctlapi.MigrateRequest{Service: "shop/web", To: machine}
}
