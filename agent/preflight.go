package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
)

const rpcLocalFacts = "machine/local" // any machine: what only it knows

// localFacts is what a machine reports of itself for a pre-flight.
type localFacts struct {
	VolumeFreeBytes uint64                 `json:"volume_free_bytes"`
	MemoryBytes     uint64                 `json:"memory_bytes"`
	HoldsVolumes    bool                   `json:"holds_volumes"`
	HasImage        bool                   `json:"has_image"`
	Images          map[string]bool        `json:"images,omitempty"` // of the asked images, which it has
	Volumes         map[string]volume.Info `json:"volumes"`          // those of the asked names it has
}

func (a *Agent) handleLocalFacts(w http.ResponseWriter, r *http.Request) {
	wl := a.currentWork()
	if wl == nil {
		http.Error(w, "not in a cluster", http.StatusConflict)
		return
	}
	q := r.URL.Query()
	out := localFacts{MemoryBytes: memAvailable(), Volumes: map[string]volume.Info{}}
	if image := q.Get("image"); image != "" {
		out.HasImage, _ = wl.rt.HasImage(r.Context(), image)
	}
	for _, image := range q["images"] {
		if out.Images == nil {
			out.Images = map[string]bool{}
		}
		out.Images[image], _ = wl.rt.HasImage(r.Context(), image)
	}
	if wl.vols != nil {
		out.HoldsVolumes = true
		out.VolumeFreeBytes, _ = wl.vols.FreeBytes()
		for _, name := range strings.Split(q.Get("volumes"), ",") {
			if name == "" {
				continue
			}
			if info, err := wl.vols.Get(q.Get("ns"), name); err == nil {
				out.Volumes[name] = info
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func (a *Agent) askLocalFacts(ctx context.Context, n *cluster.Node, machineID string, sv fsm.Service) (localFacts, error) {
	names := make([]string, 0, len(sv.Spec.Volumes))
	for _, v := range sv.Spec.Volumes {
		names = append(names, v.Name)
	}
	return queryLocalFacts(ctx, n, machineID, url.Values{"ns": {sv.Namespace}, "volumes": {strings.Join(names, ",")}, "image": {sv.Spec.Image}})
}

// queryLocalFacts asks a machine what only it knows: free pool space and
// memory, and what q asks about (volumes of a namespace, images).
func queryLocalFacts(ctx context.Context, n *cluster.Node, machineID string, q url.Values) (localFacts, error) {
	resp, err := n.CallRPC(ctx, machineID, http.MethodGet, rpcLocalFacts+"?"+q.Encode(), nil)
	if err != nil {
		return localFacts{}, err
	}
	defer resp.Body.Close()
	var lf localFacts
	return lf, json.NewDecoder(resp.Body).Decode(&lf)
}

// planMigration runs every pre-flight check and describes the move. It
// changes nothing; apply refuses to start when a check fails.
func (a *Agent) planMigration(ctx context.Context, n *cluster.Node, req ctlapi.MigrateRequest) (ctlapi.MigrationPlan, fsm.Service, fsm.Machine, error) {
	ns, name, ok := strings.Cut(req.Service, "/")
	if !ok {
		return ctlapi.MigrationPlan{}, fsm.Service{}, fsm.Machine{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: "bad_request", Err: fmt.Errorf("service %q: want namespace/name", req.Service)}
	}
	target, err := a.machineByName(n, req.To)
	if err != nil {
		return ctlapi.MigrationPlan{}, fsm.Service{}, fsm.Machine{}, err
	}
	var sv fsm.Service
	var lockHolder string
	n.Read(func(s *fsm.State) {
		sv, ok = s.Service(ns, name)
		if l, held := s.Lock(ns); held {
			lockHolder = l.Holder
		}
	})
	if !ok {
		return ctlapi.MigrationPlan{}, fsm.Service{}, fsm.Machine{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: "unknown_service", Err: fmt.Errorf("no service %s", req.Service)}
	}
	plan := ctlapi.MigrationPlan{Service: req.Service, Source: a.nameOf(sv.MachineID), Target: target.Name,
		Phases: []string{"lock namespace", "warm copy while running (repeated while the delta shrinks)", "stop source",
			"final incremental + GUID check", "start on target, wait ready", "commit (point of no return)", "cleanup: remove source container, keep source dataset"},
		After: fmt.Sprintf("%s on %s at %s; volumes owned by %s", req.Service, target.Name, sv.ServiceIP, target.Name)}
	check := func(name string, ok bool, format string, args ...any) {
		plan.Checks = append(plan.Checks, ctlapi.MigrationCheck{Name: name, OK: ok, Detail: fmt.Sprintf(format, args...)})
	}
	live := map[string]cluster.Liveness{}
	for _, m := range n.Members() {
		live[m.MachineID] = m.Liveness
	}
	check("target differs from source", target.ID != sv.MachineID, "source %s, target %s", plan.Source, target.Name)
	check("target active", target.State == fsm.MachineActive, "%s is %s", target.Name, target.State)
	check("target online", live[target.ID] == cluster.LivenessAlive, "%s is %s", target.Name, live[target.ID])
	check("source reachable", live[sv.MachineID] == cluster.LivenessAlive, "%s is %s", plan.Source, live[sv.MachineID])
	check("namespace not locked", lockHolder == "", "lock holder: %s", dashIfEmpty(lockHolder))
	check("bind mounts", len(sv.Spec.Binds) == 0, "%s", bindsDetail(sv.Spec.Binds, plan.Source))
	check("ports", true, "published on the service's own IP %s: no clash possible on the target", sv.ServiceIP)

	src, srcErr := a.askLocalFacts(ctx, n, sv.MachineID, sv)
	tgt, tgtErr := a.askLocalFacts(ctx, n, target.ID, sv)
	var referenced uint64
	for _, v := range sv.Spec.Volumes {
		pv := ctlapi.MigrationPlanVolume{Name: v.Name}
		info := src.Volumes[v.Name]
		pv.ReferencedBytes = info.ReferencedBytes
		referenced += info.ReferencedBytes
		held := map[uint64]string{}
		for _, s := range tgt.Volumes[v.Name].Snapshots {
			held[s.GUID] = s.Name
		}
		for i := len(info.Snapshots) - 1; i >= 0; i-- {
			if _, ok := held[info.Snapshots[i].GUID]; ok {
				pv.IncrementalBase, pv.BaseGUID = info.Snapshots[i].Name, info.Snapshots[i].GUID
				break
			}
		}
		plan.Volumes = append(plan.Volumes, pv)
	}
	switch {
	case srcErr != nil:
		check("volume sizes known", false, "asking the source: %v", srcErr)
	case tgtErr != nil:
		check("target answers", false, "asking the target: %v", tgtErr)
	default:
		need := referenced + referenced/10
		check("target pool space", len(sv.Spec.Volumes) == 0 || (tgt.HoldsVolumes && tgt.VolumeFreeBytes >= need),
			"free %d MiB, need 1.1 x %d MiB referenced = %d MiB", tgt.VolumeFreeBytes>>20, referenced>>20, need>>20)
		check("target memory headroom", tgt.MemoryBytes >= sv.Spec.MemoryBytes,
			"available %d MiB, service reserves %d MiB", tgt.MemoryBytes>>20, sv.Spec.MemoryBytes>>20)
		check("image on target", tgt.HasImage, "%s %s on %s", sv.Spec.Image, map[bool]string{true: "present", false: "missing (docker load it there)"}[tgt.HasImage], target.Name)
	}
	plan.OK = true
	for _, c := range plan.Checks {
		plan.OK = plan.OK && c.OK
	}
	return plan, sv, target, nil
}

// bindsDetail says what a service's bind mounts keep on its machine.
func bindsDetail(binds []fsm.BindMount, machine string) string {
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

// MigratePreview shows what a migration would do and whether it can.
func (a *Agent) MigratePreview(ctx context.Context, req ctlapi.MigrateRequest) (ctlapi.MigrationPlan, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.MigrationPlan{}, err
	}
	plan, _, _, err := a.planMigration(ctx, n, req)
	return plan, err
}
