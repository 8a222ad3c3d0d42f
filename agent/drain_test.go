package agent

import (
	"strings"
	"testing"

	"github.com/drover-sh/drover/fsm"
)

func TestPickDrainTargetSpreadsByRoomLeft(t *testing.T) {
	cand := func(name string, free, mem uint64) *drainCandidate {
		return &drainCandidate{m: fsm.Machine{ID: name, Name: name}, free: free, mem: mem, volumes: true, images: map[string]bool{"img": true}}
	}
	cands := []*drainCandidate{cand("b", 1000<<20, 4<<30), cand("c", 1000<<20, 4<<30), cand("d", 900<<20, 4<<30)}
	sv := fsm.Service{Spec: fsm.ServiceSpec{Image: "img", Volumes: []fsm.VolumeMount{{Name: "data"}}, MemoryBytes: 1 << 30}}
	var got []string
	for range 3 {
		best, why := pickDrainTarget(cands, sv, 200<<20, nil)
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
	// Full pools, a missing image, an excluded machine: none fits, each says why.
	cands[0].free = 10 << 20
	delete(cands[1].images, "img")
	best, why := pickDrainTarget(cands, sv, 200<<20, map[string]bool{"d": true})
	if best != nil {
		t.Fatalf("picked %s", best.m.Name)
	}
	for _, want := range []string{"b has 10.0 MiB of pool space, needs 200.0 MiB", "c lacks image img", "d failed to take it already"} {
		if !strings.Contains(why, want) {
			t.Errorf("reason %q lacks %q", why, want)
		}
	}
}
