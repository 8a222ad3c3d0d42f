package migrate

import (
	"context"
	"fmt"
	"net/http"
	goruntime "runtime"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/volume"
)

// handleLocalFacts answers what only this machine knows: free memory and
// pool space, the asked volumes of a namespace, the asked images.
func (m *Migrator) handleLocalFacts(ctx context.Context, _ string, q LocalQuery) (LocalFacts, error) {
	out := LocalFacts{MemoryBytes: m.cfg.MemAvailable(), MilliCPUs: uint64(goruntime.NumCPU()) * 1000, Volumes: map[string]volume.Info{}}
	for _, image := range q.Images {
		if out.Images == nil {
			out.Images, out.ImageFrom = map[string]bool{}, map[string]string{}
		}
		out.Images[image], _ = m.d.Starter.HasImage(ctx, image)
		if !out.Images[image] {
			if err := m.d.Images.CanPull(ctx, image); err != nil {
				out.ImageFrom[image] = err.Error()
			} else if host, err := runtime.RegistryOf(image); err == nil {
				out.ImageFrom[image] = "registry " + host
			}
		}
	}
	if m.holdsVolumes() {
		out.HoldsVolumes = true
		out.VolumeFreeBytes, _ = m.d.Copies.FreeBytes()
		for _, name := range q.Volumes {
			if info, err := m.d.Copies.Get(q.Namespace, name); err == nil {
				out.Volumes[name] = info
			}
		}
	}
	return out, nil
}

// LocalFacts asks a machine what only it knows.
func (m *Migrator) LocalFacts(ctx context.Context, machineID string, q LocalQuery) (LocalFacts, error) {
	return routeLocalFacts.Call(ctx, m.d.Peers, machineID, q)
}

// ServiceQuery asks for a service's volumes and image.
func ServiceQuery(sv fsm.Service) LocalQuery {
	q := LocalQuery{Namespace: sv.Namespace, Images: []string{sv.Spec.RunImage()}}
	for _, v := range sv.Spec.Volumes {
		q.Volumes = append(q.Volumes, v.Name)
	}
	return q
}

// Preview shows what a migration would do and whether it can. It changes
// nothing.
func (m *Migrator) Preview(ctx context.Context, req ctlapi.MigrateRequest) (ctlapi.MigrationPlan, error) {
	plan, _, _, err := m.plan(ctx, req)
	return plan, err
}

// plan runs every pre-flight check and describes the move. It changes
// nothing; apply refuses to start when a check fails.
func (m *Migrator) plan(ctx context.Context, req ctlapi.MigrateRequest) (ctlapi.MigrationPlan, fsm.Service, fsm.Machine, error) {
	ns, name, err := factview.SplitService(req.Service)
	if err != nil {
		return ctlapi.MigrationPlan{}, fsm.Service{}, fsm.Machine{}, err
	}
	target, err := factview.MachineByName(m.d.Facts, m.cfg.Self, req.To)
	if err != nil {
		return ctlapi.MigrationPlan{}, fsm.Service{}, fsm.Machine{}, err
	}
	var sv fsm.Service
	var ok bool
	var lockHolder string
	in := preflightInput{target: target, budget: budgetOf(req.MaxDowntime)}
	m.d.Facts.Read(func(s *fsm.State) {
		sv, ok = s.Service(ns, name)
		if l, held := s.Lock(ns); held {
			lockHolder = l.Holder
		}
		in.fixed, in.fixedFrom = fixedCost(s.Migrations(), ns, name)
		in.tgtReservedCPU = s.ReservedMilliCPUs(target.ID)
	})
	if !ok {
		return ctlapi.MigrationPlan{}, fsm.Service{}, fsm.Machine{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService, Err: fmt.Errorf("no service %s", req.Service)}
	}
	live := map[string]cluster.Liveness{}
	for _, g := range m.d.Members.Members() {
		live[g.MachineID] = g.Liveness
	}
	in.sv, in.source, in.lockHolder, in.live = sv, m.nameOf(sv.MachineID), lockHolder, live
	in.src, in.srcErr = m.LocalFacts(ctx, sv.MachineID, ServiceQuery(sv))
	in.tgt, in.tgtErr = m.LocalFacts(ctx, target.ID, ServiceQuery(sv))
	return checkPreflight(req.Service, in), sv, target, nil
}

// preflightInput is everything the pre-flight decides from.
type preflightInput struct {
	sv             fsm.Service
	target         fsm.Machine
	source         string // the source's name
	lockHolder     string
	live           map[string]cluster.Liveness
	src, tgt       LocalFacts
	srcErr, tgtErr error
	// fixed is a cutover's fixed cost from earlier moves (fixedFrom says
	// which); budget the move's downtime budget, zero for none.
	fixed     time.Duration
	fixedFrom string
	budget    time.Duration
	// tgtReservedCPU: what the target's services reserve of its cores.
	tgtReservedCPU uint64
}

// checkPreflight decides a migration's pre-flight from what was gathered:
// a pure function.
func checkPreflight(service string, in preflightInput) ctlapi.MigrationPlan {
	sv, target := in.sv, in.target
	plan := ctlapi.MigrationPlan{Service: service, Source: in.source, Target: target.Name,
		Phases: []string{"lock namespace", "warm copy while running (repeated until the predicted downtime fits the budget and the delta stops shrinking)",
			"after the first round: the target puts the copies in place and creates the container", "stop source and send the final increment in place + GUID check",
			"start on target, wait ready", "commit (point of no return)", "cleanup: remove source container, keep source dataset"},
		PredictedDowntime: ctlapi.Duration(in.fixed), FixedCostFrom: in.fixedFrom, MaxDowntime: ctlapi.Duration(in.budget),
		After: fmt.Sprintf("%s on %s at %s; volumes owned by %s", service, target.Name, sv.ServiceIP, target.Name)}
	check := func(name string, ok bool, format string, args ...any) {
		plan.Checks = append(plan.Checks, ctlapi.MigrationCheck{Name: name, OK: ok, Detail: fmt.Sprintf(format, args...)})
	}
	check("target differs from source", target.ID != sv.MachineID, "source %s, target %s", plan.Source, target.Name)
	check("target active", target.State == fsm.MachineActive, "%s is %s", target.Name, target.State)
	check("target online", in.live[target.ID] == cluster.LivenessAlive, "%s is %s", target.Name, in.live[target.ID])
	check("source reachable", in.live[sv.MachineID] == cluster.LivenessAlive, "%s is %s", plan.Source, in.live[sv.MachineID])
	check("namespace not locked", in.lockHolder == "", "lock holder: %s", dashIfEmpty(in.lockHolder))
	check("bind mounts", len(sv.Spec.Binds) == 0, "%s", BindsDetail(sv.Spec.Binds, plan.Source))
	check("ports", true, "published on the service's own IP %s: no clash possible on the target", sv.ServiceIP)
	if in.budget > 0 {
		check("downtime budget", in.fixed <= in.budget, "a cutover's fixed cost %s (%s) within the budget %s, plus the final increment, which the warm copy keeps within it",
			in.fixed.Round(time.Millisecond), in.fixedFrom, in.budget)
	} else {
		plan.MaxDowntime = ctlapi.NoDowntimeBudget
	}

	var referenced uint64
	for _, v := range sv.Spec.Volumes {
		pv := ctlapi.MigrationPlanVolume{Name: v.Name}
		info := in.src.Volumes[v.Name]
		pv.ReferencedBytes = info.ReferencedBytes
		referenced += info.ReferencedBytes
		pv.IncrementalBase, pv.BaseGUID = commonBase(info.Snapshots, in.tgt.Volumes[v.Name].Snapshots)
		plan.Volumes = append(plan.Volumes, pv)
	}
	switch {
	case in.srcErr != nil:
		check("volume sizes known", false, "asking the source: %v", in.srcErr)
	case in.tgtErr != nil:
		check("target answers", false, "asking the target: %v", in.tgtErr)
	default:
		tgt := in.tgt
		need := referenced + referenced/10
		check("target pool space", len(sv.Spec.Volumes) == 0 || (tgt.HoldsVolumes && tgt.VolumeFreeBytes >= need),
			"free %d MiB, need 1.1 x %d MiB referenced = %d MiB", tgt.VolumeFreeBytes>>20, referenced>>20, need>>20)
		check("target memory headroom", tgt.MemoryBytes >= sv.Spec.MemoryBytes,
			"available %d MiB, service reserves %d MiB", tgt.MemoryBytes>>20, sv.Spec.MemoryBytes>>20)
		if sv.Spec.MilliCPUs > 0 {
			check("target CPU headroom", tgt.MilliCPUs == 0 || in.tgtReservedCPU+sv.Spec.MilliCPUs <= tgt.MilliCPUs,
				"%d/1000 cores, %d/1000 reserved by its services, service reserves %d/1000", tgt.MilliCPUs, in.tgtReservedCPU, sv.Spec.MilliCPUs)
		}
		image := sv.Spec.RunImage()
		how := tgt.HowImage(image)
		streamed := !tgt.CanRun(image) && in.srcErr == nil && in.src.Images[image]
		if streamed {
			how = fmt.Sprintf("streamed from %s over the mesh during the warm copy (%s)", in.source, strings.TrimPrefix(how, "missing: "))
		}
		check("image on target", tgt.CanRun(image) || streamed, "%s %s on %s", image, how, target.Name)
	}
	plan.OK = true
	for _, c := range plan.Checks {
		plan.OK = plan.OK && c.OK
	}
	return plan
}

// commonBase is the newest snapshot of the source whose GUID the target
// holds too: the base of an incremental first round.
func commonBase(source, target []volume.Snapshot) (string, uint64) {
	held := map[uint64]bool{}
	for _, s := range target {
		held[s.GUID] = true
	}
	for i := len(source) - 1; i >= 0; i-- {
		if held[source[i].GUID] {
			return source[i].Name, source[i].GUID
		}
	}
	return "", 0
}

// BindsDetail says what a service's bind mounts keep on its machine.
func BindsDetail(binds []fsm.BindMount, machine string) string {
	if len(binds) == 0 {
		return "none: nothing stays behind"
	}
	dirs := make([]string, len(binds))
	for i, b := range binds {
		dirs[i] = b.HostPath
	}
	return fmt.Sprintf("host directories %s stay on %s: a bind mount pins the service", strings.Join(dirs, ", "), machine)
}

func dashIfEmpty(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
