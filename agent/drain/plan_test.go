package drain

import (
	"errors"
	"strings"
	"testing"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

func TestPickTargetSpreadsByRoomLeft(t *testing.T) {
	cand := func(name string, free, mem uint64) *candidate {
		return &candidate{m: fsm.Machine{ID: name, Name: name}, free: free, mem: mem, volumes: true}
	}
	cands := []*candidate{cand("b", 1000<<20, 4<<30), cand("c", 1000<<20, 4<<30), cand("d", 900<<20, 4<<30)}
	sv := fsm.Service{Spec: fsm.ServiceSpec{Image: "img", Volumes: []fsm.VolumeMount{{Name: "data"}}, MemoryBytes: 1 << 30}}
	var got []string
	for range 3 {
		best, why := pickTarget(cands, sv, 200<<20, nil)
		if best == nil {
			t.Fatalf("no target: %s", why)
		}
		best.free -= 200 << 20
		best.mem -= sv.Spec.MemoryBytes
		got = append(got, best.m.Name)
	}
	if strings.Join(got, ",") != "b,c,d" {
		t.Fatalf("three equal services went to %v, want one each on b, c, d", got)
	}
	// Full pools, too little memory, an excluded machine: none fits, each says why.
	cands[0].free = 10 << 20
	cands[1].mem = 1 << 20
	best, why := pickTarget(cands, sv, 200<<20, map[string]bool{"d": true})
	if best != nil {
		t.Fatalf("picked %s", best.m.Name)
	}
	for _, want := range []string{"b has 10.0 MiB of pool space, needs 200.0 MiB", "c has 1.0 MiB of memory, needs 1024.0 MiB", "d failed to take it already"} {
		if !strings.Contains(why, want) {
			t.Errorf("reason %q lacks %q", why, want)
		}
	}
}

func TestPlanPlacesLargestFirstAndSaysWhatStays(t *testing.T) {
	svc := func(name string, vols int) fsm.Service {
		sp := fsm.ServiceSpec{Name: name, Image: "img", MemoryBytes: 1 << 20}
		for range vols {
			sp.Volumes = append(sp.Volumes, fsm.VolumeMount{Name: "v"})
		}
		return fsm.Service{Namespace: "ns", Spec: sp}
	}
	pinned := svc("pinned", 0)
	pinned.Spec.Binds = []fsm.BindMount{{HostPath: "/srv"}}
	in := planInput{
		machine: fsm.Machine{ID: "a", Name: "a"}, live: cluster.LivenessAlive,
		services: []sized{{sv: svc("small", 1), need: 100 << 20}, {sv: svc("big", 1), need: 700 << 20}, {sv: pinned},
			{sv: svc("unsized", 1), err: errors.New("a does not say how large its volumes are")}},
		idle: []fsm.Volume{{Namespace: "ns", Name: "orphan"}},
		cands: []*candidate{
			{m: fsm.Machine{ID: "b", Name: "b"}, free: 750 << 20, mem: 1 << 30, volumes: true},
			{m: fsm.Machine{ID: "c", Name: "c"}, free: 500 << 20, mem: 1 << 30, volumes: true},
		},
	}
	got := map[string]fsm.DrainItem{}
	for _, it := range plan(in) {
		got[it.Service] = it
	}
	// big first takes b (the only one with room), small then goes to c.
	if got["ns/big"].Target != "b" || got["ns/small"].Target != "c" {
		t.Fatalf("placements %+v", got)
	}
	for key, want := range map[string]string{"ns/pinned": "/srv", "ns/unsized": "how large", "volume ns/orphan": "no service uses it"} {
		if it := got[key]; it.State != fsm.ItemStays || !strings.Contains(it.Reason, want) {
			t.Errorf("%s: %+v, want stays with %q", key, it, want)
		}
	}
	// A machine gossip does not see alive: nothing can be copied from it.
	in.live = cluster.LivenessFailed
	for _, it := range plan(in) {
		if it.State != fsm.ItemStays {
			t.Errorf("%s planned off a failed machine", it.Service)
		}
	}
}

func TestPickTargetCountsReservedCores(t *testing.T) {
	cands := []*candidate{
		{m: fsm.Machine{ID: "b", Name: "b"}, free: 1 << 30, mem: 1 << 30, cpu: 500, cpuKnown: true},
		{m: fsm.Machine{ID: "c", Name: "c"}, free: 1 << 20, mem: 1 << 30, cpu: 2000, cpuKnown: true},
	}
	sv := fsm.Service{Spec: fsm.ServiceSpec{Image: "img", MilliCPUs: 1000}}
	best, why := pickTarget(cands, sv, 0, nil)
	if best == nil || best.m.Name != "c" {
		t.Fatalf("picked %v (%s), want c: b has half a core left", best, why)
	}
	cands[1].cpu = 0
	if best, why = pickTarget(cands, sv, 0, nil); best != nil || !strings.Contains(why, "b has 500/1000 cores unreserved, needs 1000/1000") {
		t.Fatalf("picked %v, why %q", best, why)
	}
}
