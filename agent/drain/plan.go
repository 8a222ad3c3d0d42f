package drain

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/migrate"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// candidate is a machine that may take services of a drain, with what is
// left of it as the plan fills it.
type candidate struct {
	m        fsm.Machine
	free     uint64 // pool space
	mem      uint64
	cpu      uint64 // thousandths of a core left (0 with cpuKnown false: not told)
	cpuKnown bool
	volumes  bool   // it holds volumes
	problems string // why it cannot take anything, when it cannot
}

// sized is a service of the drained machine with the pool space it needs
// on a target (1.1 x its volumes' referenced bytes).
type sized struct {
	sv   fsm.Service
	need uint64
	err  error // its size could not be asked
}

// planInput is everything a plan is computed from.
type planInput struct {
	machine  fsm.Machine
	live     cluster.Liveness // of the drained machine
	services []sized
	idle     []fsm.Volume // volumes on the machine no service uses
	cands    []*candidate
	exclude  map[string]map[string]bool // per service, machines that failed it
}

// plan gives a target to every service, by free pool space and memory,
// each placement lowering what is left of its target: the services
// spread over the machines with the most room. Services that cannot move
// get the reason and stay. A pure function of its input (it uses up the
// candidates' room).
func plan(in planInput) []fsm.DrainItem {
	sizes := slices.Clone(in.services)
	// Largest first: they are the hardest to place.
	slices.SortStableFunc(sizes, func(x, y sized) int { return cmp.Compare(y.need, x.need) })
	var items []fsm.DrainItem
	for _, z := range sizes {
		it := fsm.DrainItem{Service: z.sv.Key(), State: fsm.ItemPending}
		switch {
		case len(z.sv.Spec.Binds) > 0:
			it.State, it.Reason = fsm.ItemStays, migrate.BindsDetail(z.sv.Spec.Binds, in.machine.Name)
		case in.live != cluster.LivenessAlive:
			it.State, it.Reason = fsm.ItemStays, fmt.Sprintf("%s is %s: nothing can be copied from it", in.machine.Name, cmp.Or(string(in.live), "unknown"))
		case z.err != nil:
			it.State, it.Reason = fsm.ItemStays, z.err.Error()
		default:
			best, why := pickTarget(in.cands, z.sv, z.need, in.exclude[z.sv.Key()])
			if best == nil {
				it.State, it.Reason = fsm.ItemStays, "no machine can take it: "+why
				break
			}
			it.Target = best.m.ID
			best.free -= min(best.free, z.need)
			best.mem -= min(best.mem, z.sv.Spec.MemoryBytes)
			best.cpu -= min(best.cpu, z.sv.Spec.MilliCPUs)
		}
		items = append(items, it)
	}
	for _, v := range in.idle {
		items = append(items, fsm.DrainItem{Service: "volume " + v.Key(), State: fsm.ItemStays,
			Reason: "no service uses it, and only a service's migration moves a volume"})
	}
	slices.SortStableFunc(items, func(x, y fsm.DrainItem) int { return strings.Compare(x.Service, y.Service) })
	return items
}

// pickTarget chooses the candidate with the most pool space left after
// taking the service, then the most memory; why says, when none fits,
// what each lacks.
func pickTarget(cands []*candidate, sv fsm.Service, need uint64, exclude map[string]bool) (*candidate, string) {
	var best *candidate
	var why []string
	for _, c := range cands {
		var lack string
		switch {
		case c.problems != "":
			lack = c.problems
		case exclude[c.m.ID]:
			lack = fmt.Sprintf("%s failed to take it already", c.m.Name)
		case len(sv.Spec.Volumes) > 0 && !c.volumes:
			lack = fmt.Sprintf("%s holds no volumes", c.m.Name)
		case c.free < need:
			lack = fmt.Sprintf("%s has %s of pool space, needs %s", c.m.Name, mibs(c.free), mibs(need))
		case c.mem < sv.Spec.MemoryBytes:
			lack = fmt.Sprintf("%s has %s of memory, needs %s", c.m.Name, mibs(c.mem), mibs(sv.Spec.MemoryBytes))
		case c.cpuKnown && c.cpu < sv.Spec.MilliCPUs:
			lack = fmt.Sprintf("%s has %d/1000 cores unreserved, needs %d/1000", c.m.Name, c.cpu, sv.Spec.MilliCPUs)
		}
		if lack != "" {
			why = append(why, lack)
			continue
		}
		if best == nil || c.free-need > best.free-need || (c.free == best.free && c.mem > best.mem) {
			best = c
		}
	}
	if len(why) == 0 {
		why = append(why, "there is no other machine")
	}
	return best, strings.Join(why, "; ")
}

func mibs(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// plan gathers what a plan needs — the facts, gossip's liveness, and
// what each machine says of itself — and computes it. only limits the
// plan to those services; exclude keeps machines out per service.
func (d *Drainer) plan(ctx context.Context, machine fsm.Machine, only map[string]bool, exclude map[string]map[string]bool) []fsm.DrainItem {
	in := planInput{machine: machine, exclude: exclude}
	var services []fsm.Service
	var machines []fsm.Machine
	d.facts.Read(func(s *fsm.State) {
		used := map[string]bool{}
		for _, sv := range s.Services() {
			for _, v := range sv.Spec.Volumes {
				used[sv.Namespace+"/"+v.Name] = true
			}
			if sv.MachineID == machine.ID && (only == nil || only[sv.Key()]) {
				services = append(services, sv)
			}
		}
		for _, v := range s.Volumes() {
			if v.OwnerID == machine.ID && !used[v.Key()] && only == nil {
				in.idle = append(in.idle, v)
			}
		}
		machines = s.Machines()
	})
	live := map[string]cluster.Liveness{}
	for _, g := range d.gos.Members() {
		live[g.MachineID] = g.Liveness
	}
	in.live = live[machine.ID]
	// Images do not limit the targets: the draining machine runs every
	// service it holds, so it streams an image a target cannot pull.
	for _, m := range machines {
		if m.ID == machine.ID {
			continue
		}
		c := &candidate{m: m}
		switch {
		case m.State != fsm.MachineActive:
			c.problems = fmt.Sprintf("%s is %s", m.Name, m.State)
		case live[m.ID] != cluster.LivenessAlive:
			c.problems = fmt.Sprintf("%s is %s", m.Name, cmp.Or(string(live[m.ID]), "unknown"))
		default:
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			lf, err := d.migs.LocalFacts(cctx, m.ID, migrate.LocalQuery{})
			cancel()
			if err != nil {
				c.problems = fmt.Sprintf("%s does not answer: %v", m.Name, err)
			}
			c.free, c.mem, c.volumes = lf.VolumeFreeBytes, lf.MemoryBytes, lf.HoldsVolumes
			if lf.MilliCPUs > 0 {
				var reserved uint64
				d.facts.Read(func(s *fsm.State) { reserved = s.ReservedMilliCPUs(m.ID) })
				c.cpu, c.cpuKnown = lf.MilliCPUs-min(lf.MilliCPUs, reserved), true
			}
		}
		in.cands = append(in.cands, c)
	}
	for _, sv := range services {
		z := sized{sv: sv}
		if len(sv.Spec.Volumes) > 0 {
			lf, err := d.migs.LocalFacts(ctx, machine.ID, migrate.ServiceQuery(sv))
			if err != nil {
				z.err = fmt.Errorf("%s does not say how large its volumes are: %w", machine.Name, err)
			}
			for _, v := range sv.Spec.Volumes {
				z.need += lf.Volumes[v.Name].ReferencedBytes
			}
			z.need += z.need / 10
		}
		in.services = append(in.services, z)
	}
	return plan(in)
}
