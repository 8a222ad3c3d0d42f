package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/manifest"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// deployStep is one service change a deploy makes.
type deployStep struct {
	spec      fsm.ServiceSpec
	machineID string
	remove    bool
	migrate   bool // move the running service and its volumes to machineID
}

func badManifest(err error) error {
	return &ctlapi.APIError{Status: http.StatusBadRequest, Code: "bad_manifest", Err: err}
}

// planDeploy parses the manifest and decides, against the current facts,
// what changes where. It changes nothing.
func (a *Agent) planDeploy(n *cluster.Node, req ctlapi.DeployRequest) (ctlapi.DeployPlan, []deployStep, error) {
	file := req.File
	if file == "" {
		file = "manifest"
	}
	m, err := manifest.Parse(file, []byte(req.Manifest))
	if err != nil {
		return ctlapi.DeployPlan{}, nil, badManifest(err)
	}
	alive := map[string]bool{}
	for _, g := range n.Members() {
		alive[g.MachineID] = g.Liveness == cluster.LivenessAlive || g.Liveness == cluster.LivenessSuspect
	}
	plan := ctlapi.DeployPlan{Namespace: m.Namespace}
	var steps []deployStep
	var problems manifest.Errors
	n.Read(func(s *fsm.State) {
		names := map[string]string{}
		for _, mc := range s.Machines() {
			names[mc.ID] = mc.Name
		}
		inManifest := map[string]bool{}
		for _, sp := range m.Services {
			inManifest[sp.Name] = true
			ps := ctlapi.PlannedService{Name: sp.Name}
			old, exists := s.Service(m.Namespace, sp.Name)
			machineID, note, err := place(s, alive, m.Namespace, sp, old, exists, m.Move[sp.Name])
			if err != nil {
				problems = append(problems, &manifest.Error{File: file, Key: "services." + sp.Name + ".machine", Msg: err.Error()})
				continue
			}
			ps.Machine, ps.PlacementNote = names[machineID], note
			switch {
			case exists && machineID != old.MachineID:
				if ch := specChanges(old.Spec, sp); len(ch) > 0 {
					problems = append(problems, &manifest.Error{File: file, Key: "services." + sp.Name,
						Msg: fmt.Sprintf("moves to %s and changes %s: deploy the change and the move separately", names[machineID], strings.Join(ch, ", "))})
					continue
				}
				ps.Action, ps.Generation, ps.ServiceIP = "migrate", old.Generation, old.ServiceIP.String()
				ps.Changes = []string{"machine: " + names[old.MachineID] + " -> " + names[machineID]}
			case !exists:
				ps.Action, ps.Generation = "create", 1
			case len(specChanges(old.Spec, sp)) == 0: // a placement that agrees with where it runs is no change
				ps.Action, ps.Generation, ps.ServiceIP = "unchanged", old.Generation, old.ServiceIP.String()
			default:
				ps.Action, ps.Generation, ps.ServiceIP = "change", old.Generation+1, old.ServiceIP.String()
				ps.Changes = specChanges(old.Spec, sp)
			}
			for _, v := range sp.Volumes {
				if _, ok := s.Volume(m.Namespace, v.Name); !ok {
					ps.CreateVolumes = append(ps.CreateVolumes, fmt.Sprintf("%s (%d MiB quota)", v.Name, v.QuotaBytes>>20))
				}
			}
			if sp.Readiness == nil {
				plan.Warnings = append(plan.Warnings, fmt.Sprintf("service %s has no readiness check: running counts as ready", sp.Name))
			}
			plan.Services = append(plan.Services, ps)
			if ps.Action != "unchanged" {
				steps = append(steps, deployStep{spec: sp, machineID: machineID, migrate: ps.Action == "migrate"})
			}
		}
		for _, sv := range s.Services() {
			if sv.Namespace == m.Namespace && !inManifest[sv.Spec.Name] {
				plan.Services = append(plan.Services, ctlapi.PlannedService{Name: sv.Spec.Name, Action: "remove",
					Machine: names[sv.MachineID], ServiceIP: sv.ServiceIP.String(), Generation: sv.Generation})
				steps = append(steps, deployStep{spec: sv.Spec, machineID: sv.MachineID, remove: true})
				plan.Warnings = append(plan.Warnings, fmt.Sprintf("service %s is not in the manifest and will be removed (its volumes are kept)", sv.Spec.Name))
			}
		}
	})
	if len(problems) > 0 {
		return plan, nil, badManifest(problems)
	}
	return plan, steps, nil
}

// place picks the machine of a service: where it runs already, else where
// the manifest says, else where its volumes are, else the active, alive
// machine with the most free volume space and memory.
func place(s *fsm.State, alive map[string]bool, ns string, sp fsm.ServiceSpec, old fsm.Service, exists, move bool) (string, string, error) {
	usable := func(m fsm.Machine) error {
		if m.State != fsm.MachineActive {
			return fmt.Errorf("machine %s is %s: it takes no new placements", m.Name, m.State)
		}
		return nil
	}
	if sp.Machine != "" {
		m, ok := s.MachineByName(sp.Machine)
		if !ok {
			return "", "", fmt.Errorf("no machine named %q in the cluster", sp.Machine)
		}
		if exists && old.MachineID != m.ID && !move {
			return "", "", fmt.Errorf("service %s runs on another machine: moving it is a migration (mark its volumes move = true, or droverctl migrate)", sp.Name)
		}
		if exists && old.MachineID != m.ID {
			return m.ID, "migrates there with its volumes", nil
		}
		if !exists {
			if err := usable(m); err != nil {
				return "", "", err
			}
		}
		return m.ID, "as the manifest asks", nil
	}
	if exists {
		return old.MachineID, "where it runs", nil
	}
	for _, v := range sp.Volumes {
		if vol, ok := s.Volume(ns, v.Name); ok {
			return vol.OwnerID, "where its volume " + v.Name + " is", nil
		}
	}
	var best *fsm.Machine
	for _, m := range s.Machines() {
		if usable(m) != nil || !alive[m.ID] || (len(sp.Volumes) > 0 && m.Capacity.DiskBytes == 0) {
			continue
		}
		if best == nil || m.Capacity.DiskBytes > best.Capacity.DiskBytes ||
			(m.Capacity.DiskBytes == best.Capacity.DiskBytes && m.Capacity.MemoryBytes > best.Capacity.MemoryBytes) {
			m := m
			best = &m
		}
	}
	if best == nil {
		return "", "", errors.New("no active, alive machine can take it (volumes need a machine with a ZFS parent)")
	}
	return best.ID, "most free space", nil
}

// specChanges names the fields that differ, for the preview.
func specChanges(a, b fsm.ServiceSpec) []string {
	var out []string
	diff := func(name string, x, y any) {
		jx, _ := json.Marshal(x)
		jy, _ := json.Marshal(y)
		if string(jx) != string(jy) {
			out = append(out, name)
		}
	}
	diff("image", a.Image, b.Image)
	diff("command", a.Command, b.Command)
	diff("env", a.Env, b.Env)
	diff("ports", a.Ports, b.Ports)
	diff("volumes", a.Volumes, b.Volumes)
	diff("readiness", a.Readiness, b.Readiness)
	diff("memory", a.MemoryBytes, b.MemoryBytes)
	return out
}

// DeployPreview shows what a manifest would change. It changes nothing.
func (a *Agent) DeployPreview(_ context.Context, req ctlapi.DeployRequest) (ctlapi.DeployPlan, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.DeployPlan{}, err
	}
	plan, _, err := a.planDeploy(n, req)
	return plan, err
}

// Deploy applies a manifest under the namespace lock and waits until every
// service it changed is ready, or one failed.
func (a *Agent) Deploy(ctx context.Context, req ctlapi.DeployRequest) (ctlapi.DeployResult, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.DeployResult{}, err
	}
	plan, steps, err := a.planDeploy(n, req)
	if err != nil {
		return ctlapi.DeployResult{}, err
	}
	if moves := migrateSteps(steps); len(moves) > 0 {
		if len(moves) != len(steps) {
			return ctlapi.DeployResult{Plan: plan}, badManifest(fmt.Errorf(
				"%s: the manifest moves services and changes others: deploy the changes and the moves separately", req.File))
		}
		return a.deployMoves(ctx, n, plan, moves)
	}
	holder := a.cfg.Name + "/deploy/" + randomSuffix()
	if err := a.acquire(ctx, n, plan.Namespace, holder); err != nil {
		return ctlapi.DeployResult{Plan: plan}, err
	}
	lockCtx, stopRenew := context.WithCancel(ctx)
	renewDone := make(chan struct{})
	go func() { defer close(renewDone); a.renewLock(lockCtx, n, plan.Namespace, holder) }()
	defer func() {
		stopRenew()
		<-renewDone
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, err := n.Apply(rctx, fsm.ReleaseLock{Namespace: plan.Namespace, Holder: holder, At: time.Now()}); err != nil {
			a.logger.Warn("releasing namespace lock", "namespace", plan.Namespace, "err", err)
		}
	}()
	// Plan again under the lock: the facts may have changed meanwhile.
	plan, steps, err = a.planDeploy(n, req)
	if err != nil {
		return ctlapi.DeployResult{Plan: plan}, err
	}
	prefix := a.cfg.ServicePrefix
	for _, st := range steps {
		var cmd fsm.Command = fsm.PutService{Namespace: plan.Namespace, Holder: holder, Spec: st.spec,
			MachineID: st.machineID, ServicePrefix: prefix, At: time.Now()}
		if st.remove {
			cmd = fsm.RemoveService{Namespace: plan.Namespace, Name: st.spec.Name, Holder: holder, At: time.Now()}
		}
		if _, err := n.Apply(ctx, cmd); err != nil {
			return ctlapi.DeployResult{Plan: plan}, fmt.Errorf("deploying %s/%s: %w", plan.Namespace, st.spec.Name, err)
		}
	}
	if err := a.waitReady(ctx, n, plan.Namespace, steps); err != nil {
		return ctlapi.DeployResult{Plan: plan}, err
	}
	svcs, err := a.Services(ctx)
	var mine []ctlapi.Service
	for _, s := range svcs {
		if s.Namespace == plan.Namespace {
			mine = append(mine, s)
		}
	}
	return ctlapi.DeployResult{Plan: plan, Services: mine}, err
}

func migrateSteps(steps []deployStep) []deployStep {
	var out []deployStep
	for _, st := range steps {
		if st.migrate {
			out = append(out, st)
		}
	}
	return out
}

// deployMoves performs a manifest's moves: each is the migration
// `migrate apply` runs (pre-flight, its own hold of the namespace lock,
// warm copy, commit), one after the other; the first that fails ends
// the deploy.
func (a *Agent) deployMoves(ctx context.Context, n *cluster.Node, plan ctlapi.DeployPlan, moves []deployStep) (ctlapi.DeployResult, error) {
	res := ctlapi.DeployResult{Plan: plan}
	for _, st := range moves {
		target := a.nameOf(st.machineID)
		info, err := a.migrate(ctx, ctlapi.MigrateRequest{Service: plan.Namespace + "/" + st.spec.Name, To: target}, "", func(ctlapi.MigrationEvent) {})
		if info.ID != "" {
			res.Migrations = append(res.Migrations, info)
		}
		if err != nil {
			return res, fmt.Errorf("moving %s/%s to %s: %w", plan.Namespace, st.spec.Name, target, err)
		}
	}
	svcs, err := a.Services(ctx)
	for _, s := range svcs {
		if s.Namespace == plan.Namespace {
			res.Services = append(res.Services, s)
		}
	}
	return res, err
}

// RenderManifest gives the manifest that moves a service: its namespace's
// services as they are, with the service placed on the target and its
// volumes marked to move. `deploy -f` with it runs the migration.
func (a *Agent) RenderManifest(_ context.Context, req ctlapi.MigrateRequest) (ctlapi.RenderedManifest, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.RenderedManifest{}, err
	}
	ns, name, ok := strings.Cut(req.Service, "/")
	if !ok {
		return ctlapi.RenderedManifest{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: "bad_request", Err: fmt.Errorf("service %q: want namespace/name", req.Service)}
	}
	target, err := a.machineByName(n, req.To)
	if err != nil {
		return ctlapi.RenderedManifest{}, err
	}
	var specs []fsm.ServiceSpec
	found := false
	n.Read(func(s *fsm.State) {
		for _, sv := range s.Services() {
			if sv.Namespace != ns {
				continue
			}
			sp := sv.Spec
			if sp.Name == name {
				found = true
				sp.Machine = target.Name
			}
			specs = append(specs, sp)
		}
	})
	if !found {
		return ctlapi.RenderedManifest{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: "unknown_service", Err: fmt.Errorf("no service %s", req.Service)}
	}
	return ctlapi.RenderedManifest{Namespace: ns, Text: manifest.Render(ns, specs, map[string]bool{name: true})}, nil
}

func randomSuffix() string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// acquire takes the namespace lock or says who holds it and for how long.
func (a *Agent) acquire(ctx context.Context, n *cluster.Node, ns, holder string) error {
	_, err := n.Apply(ctx, fsm.AcquireLock{Namespace: ns, Holder: holder, Lease: a.cfg.LockLease, At: time.Now()})
	var rule *fsm.RuleError
	if errors.As(err, &rule) && errors.Is(err, fsm.ErrLockHeld) {
		return &ctlapi.APIError{Status: http.StatusConflict, Code: "namespace_locked", Err: fmt.Errorf(
			"namespace %q is locked by %s for %s: another deploy or migration is running there",
			ns, rule.Holder, time.Since(rule.Since).Round(time.Second))}
	}
	if err != nil {
		return fmt.Errorf("locking namespace %s: %w", ns, err)
	}
	return nil
}

func (a *Agent) renewLock(ctx context.Context, n *cluster.Node, ns, holder string) {
	tick := time.NewTicker(a.cfg.LockLease / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if _, err := n.Apply(ctx, fsm.RenewLock{Namespace: ns, Holder: holder, Lease: a.cfg.LockLease, At: time.Now()}); err != nil && ctx.Err() == nil {
			a.logger.Warn("renewing namespace lock", "namespace", ns, "err", err)
		}
	}
}

// waitReady waits until every created or changed service reports ready
// for its new generation; the first failure ends the wait with the
// service, its machine and the reason.
func (a *Agent) waitReady(ctx context.Context, n *cluster.Node, ns string, steps []deployStep) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	for {
		var waiting []string
		var failed error
		n.Read(func(s *fsm.State) {
			for _, st := range steps {
				if st.remove {
					continue
				}
				sv, ok := s.Service(ns, st.spec.Name)
				if !ok {
					continue
				}
				mname := st.machineID
				if m, ok := s.Machine(st.machineID); ok {
					mname = m.Name
				}
				switch {
				case sv.Status.Generation == sv.Generation && sv.Status.Ready:
				case sv.Status.Generation == sv.Generation && sv.Status.Error != "":
					failed = fmt.Errorf("service %s/%s failed on %s: %s", ns, st.spec.Name, mname, sv.Status.Error)
				default:
					waiting = append(waiting, st.spec.Name+" on "+mname)
				}
			}
		})
		if failed != nil {
			return &ctlapi.APIError{Status: http.StatusUnprocessableEntity, Code: "service_failed", Err: failed}
		}
		if len(waiting) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			sort.Strings(waiting)
			return fmt.Errorf("waiting for %s to be ready: %w", strings.Join(waiting, ", "), ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Services lists every service with where it runs and whether it is ready.
func (a *Agent) Services(context.Context) ([]ctlapi.Service, error) {
	n, err := a.requireNode()
	if err != nil {
		return nil, err
	}
	var out []ctlapi.Service
	n.Read(func(s *fsm.State) {
		for _, sv := range s.Services() {
			row := ctlapi.Service{Namespace: sv.Namespace, Name: sv.Spec.Name, ServiceIP: sv.ServiceIP.String(),
				Generation: sv.Generation, Machine: sv.MachineID, State: "starting"}
			if m, ok := s.Machine(sv.MachineID); ok {
				row.Machine = m.Name
			}
			if sv.Status.Generation == sv.Generation {
				row.Ready = sv.Status.Ready
				if sv.Status.Ready {
					row.State = "ready"
				} else if sv.Status.Error != "" {
					row.State, row.Error = "failed", sv.Status.Error
				}
			}
			out = append(out, row)
		}
	})
	return out, nil
}

// Volumes lists every volume; this machine adds what its ZFS knows of the
// volumes it owns.
func (a *Agent) Volumes(context.Context) ([]ctlapi.Volume, error) {
	n, err := a.requireNode()
	if err != nil {
		return nil, err
	}
	var out []ctlapi.Volume
	mine := map[int]bool{}
	n.Read(func(s *fsm.State) {
		for _, v := range s.Volumes() {
			mine[len(out)] = v.OwnerID == a.machineID
			row := ctlapi.Volume{Namespace: v.Namespace, Name: v.Name, Owner: v.OwnerID, QuotaBytes: v.QuotaBytes}
			if m, ok := s.Machine(v.OwnerID); ok {
				row.Owner = m.Name
			}
			out = append(out, row)
		}
	})
	a.mu.Lock()
	w := a.work
	a.mu.Unlock()
	if w == nil || w.vols == nil {
		return out, nil
	}
	for i, row := range out {
		if !mine[i] {
			continue
		}
		info, err := w.vols.Get(row.Namespace, row.Name)
		if err != nil {
			continue
		}
		out[i].UsedBytes, out[i].Dataset = info.ReferencedBytes, info.Dataset
		if k := len(info.Snapshots); k > 0 {
			out[i].NewestSnapshot = info.Snapshots[k-1].Name
		}
	}
	return out, nil
}
