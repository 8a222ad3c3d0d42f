package deploy

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/manifest"
	"github.com/drover-sh/drover/fsm"
)

// change is one service change a deploy makes.
type change struct {
	spec      fsm.ServiceSpec
	machineID string
	remove    bool
	migrate   bool   // move the running service and its volumes to machineID
	standbyID string // the machine keeping the standby copy (spec.Standby)
}

func movesOf(changes []change) []change {
	var out []change
	for _, c := range changes {
		if c.migrate {
			out = append(out, c)
		}
	}
	return out
}

// planChanges decides, against the facts and the machines gossip sees alive,
// what a parsed manifest changes where: a pure function. A problem with
// the manifest is a *manifest.Errors naming file and key, wrapped as the
// control API's bad_manifest.
func planChanges(s *fsm.State, seen machineView, file string, m *manifest.Manifest) (ctlapi.DeployPlan, []change, error) {
	p := ctlapi.DeployPlan{Namespace: m.Namespace}
	var changes []change
	var problems manifest.Errors
	inManifest := map[string]bool{}
	for _, sp := range m.Services {
		inManifest[sp.Name] = true
		ps := ctlapi.PlannedService{Name: sp.Name, Image: sp.Image, ImageRef: sp.ImageRef}
		old, exists := s.Service(m.Namespace, sp.Name)
		machineID, note, err := place(s, seen, m.Namespace, sp, old, exists, m.Move[sp.Name])
		if err != nil {
			problems = append(problems, &manifest.Error{File: file, Key: "services." + sp.Name + ".machine", Msg: err.Error()})
			continue
		}
		ps.Machine, ps.PlacementNote = s.NameOf(machineID), note
		var standbyID string
		if sp.Standby != nil {
			if standbyID, err = pickStandby(s, seen, sp, machineID, old, exists); err != nil {
				problems = append(problems, &manifest.Error{File: file, Key: "services." + sp.Name + ".standby.machine", Msg: err.Error()})
				continue
			}
			ps.Standby = s.NameOf(standbyID)
		}
		switch {
		case exists && machineID != old.MachineID:
			if ch := specChanges(old.Spec, sp); len(ch) > 0 {
				problems = append(problems, &manifest.Error{File: file, Key: "services." + sp.Name,
					Msg: fmt.Sprintf("moves to %s and changes %s: deploy the change and the move separately", s.NameOf(machineID), strings.Join(ch, ", "))})
				continue
			}
			ps.Action, ps.Generation, ps.ServiceIP = "migrate", old.Generation, old.ServiceIP.String()
			ps.Changes = []string{"machine: " + s.NameOf(old.MachineID) + " -> " + s.NameOf(machineID)}
		case !exists:
			ps.Action, ps.Generation = "create", 1
		case len(specChanges(old.Spec, sp)) == 0 && old.StandbyID == standbyID: // a placement that agrees with where it runs is no change
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
			p.Warnings = append(p.Warnings, fmt.Sprintf("service %s has no readiness check: running counts as ready", sp.Name))
		}
		p.Services = append(p.Services, ps)
		if ps.Action != "unchanged" {
			changes = append(changes, change{spec: sp, machineID: machineID, migrate: ps.Action == "migrate", standbyID: standbyID})
		}
	}
	for _, sv := range s.Services() {
		if sv.Namespace == m.Namespace && !inManifest[sv.Spec.Name] {
			p.Services = append(p.Services, ctlapi.PlannedService{Name: sv.Spec.Name, Action: "remove",
				Machine: s.NameOf(sv.MachineID), ServiceIP: sv.ServiceIP.String(), Generation: sv.Generation})
			changes = append(changes, change{spec: sv.Spec, machineID: sv.MachineID, remove: true})
			p.Warnings = append(p.Warnings, fmt.Sprintf("service %s is not in the manifest and will be removed (its volumes are kept)", sv.Spec.Name))
		}
	}
	if len(problems) > 0 {
		return p, nil, badManifest(problems)
	}
	return p, changes, nil
}

// machineView is what gossip tells of the machines: which are alive, and
// their cores in thousandths (0: not told).
type machineView struct {
	alive map[string]bool
	cores map[string]uint64
}

// cpusFit tells whether the machine has the cores the service reserves
// left, counting what the other services it holds reserve.
func (v machineView) cpusFit(s *fsm.State, m fsm.Machine, sp fsm.ServiceSpec, old fsm.Service, exists bool) error {
	cores := v.cores[m.ID]
	if sp.MilliCPUs == 0 || cores == 0 {
		return nil
	}
	reserved := s.ReservedMilliCPUs(m.ID)
	if exists && old.MachineID == m.ID {
		reserved -= min(reserved, old.Spec.MilliCPUs)
	}
	if reserved+sp.MilliCPUs > cores {
		return fmt.Errorf("machine %s has %s cores, %s reserved by its services: %s asks %s", m.Name, milli(cores), milli(reserved), sp.Name, milli(sp.MilliCPUs))
	}
	return nil
}

// milli writes thousandths as a decimal: 1500 is "1.5".
func milli(n uint64) string {
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%d.%03d", n/1000, n%1000), "0"), ".")
}

// place picks the machine of a service: where it runs already, else where
// the manifest says, else where its volumes are, else the active, alive
// machine with the most free volume space and memory.
func place(s *fsm.State, seen machineView, ns string, sp fsm.ServiceSpec, old fsm.Service, exists, move bool) (string, string, error) {
	alive := seen.alive
	usable := func(m fsm.Machine) error {
		if m.State != fsm.MachineActive {
			return fmt.Errorf("machine %s is %s: it takes no new placements", m.Name, m.State)
		}
		return seen.cpusFit(s, m, sp, old, exists)
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
		} else if err := seen.cpusFit(s, m, sp, old, exists); err != nil {
			return "", "", err
		}
		return m.ID, "as the manifest asks", nil
	}
	if exists {
		if m, ok := s.Machine(old.MachineID); ok {
			if err := seen.cpusFit(s, m, sp, old, exists); err != nil {
				return "", "", err
			}
		}
		return old.MachineID, "where it runs", nil
	}
	for _, v := range sp.Volumes {
		if vol, ok := s.Volume(ns, v.Name); ok {
			return vol.OwnerID, "where its volume " + v.Name + " is", nil
		}
	}
	var best *fsm.Machine
	var short []string // machines without the cores it asks
	for _, m := range s.Machines() {
		if err := usable(m); err != nil || !alive[m.ID] || (len(sp.Volumes) > 0 && m.Capacity.DiskBytes == 0) {
			if err != nil && m.State == fsm.MachineActive && alive[m.ID] {
				short = append(short, err.Error())
			}
			continue
		}
		if best == nil || m.Capacity.DiskBytes > best.Capacity.DiskBytes ||
			(m.Capacity.DiskBytes == best.Capacity.DiskBytes && m.Capacity.MemoryBytes > best.Capacity.MemoryBytes) {
			m := m
			best = &m
		}
	}
	if best == nil && len(short) > 0 {
		return "", "", fmt.Errorf("no machine has the cores: %s", strings.Join(short, "; "))
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
	if a.Image == b.Image {
		diff("image digest", a.ImageRef, b.ImageRef) // the tag now names other bits
	}
	diff("binds", a.Binds, b.Binds)
	diff("stop signal", a.StopSignal, b.StopSignal)
	diff("stop timeout", a.StopTimeout, b.StopTimeout)
	diff("command", a.Command, b.Command)
	diff("env", a.Env, b.Env)
	diff("ports", a.Ports, b.Ports)
	diff("volumes", a.Volumes, b.Volumes)
	diff("readiness", a.Readiness, b.Readiness)
	diff("memory", a.MemoryBytes, b.MemoryBytes)
	diff("flush", a.Flush, b.Flush)
	diff("entrypoint", a.Entrypoint, b.Entrypoint)
	diff("user", a.User, b.User)
	diff("working_dir", a.WorkingDir, b.WorkingDir)
	diff("labels", a.Labels, b.Labels)
	diff("read_only", a.ReadOnly, b.ReadOnly)
	diff("tmpfs", a.Tmpfs, b.Tmpfs)
	diff("restart", a.Restart, b.Restart)
	diff("restart_max", a.RestartMax, b.RestartMax)
	diff("health", a.Health, b.Health)
	diff("cpus", a.MilliCPUs, b.MilliCPUs)
	diff("secrets", a.Secrets, b.Secrets)
	diff("standby", a.Standby, b.Standby)
	return out
}

func randomSuffix() string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// pickStandby chooses the machine that keeps a service's standby copy:
// the one the manifest names; else the one it has (when it still can);
// else the active, alive machine other than the owner with volumes and
// the most free space.
func pickStandby(s *fsm.State, seen machineView, sp fsm.ServiceSpec, owner string, old fsm.Service, exists bool) (string, error) {
	can := func(m fsm.Machine) error {
		switch {
		case m.ID == owner:
			return fmt.Errorf("machine %s runs the service: a standby is another machine", m.Name)
		case m.State != fsm.MachineActive:
			return fmt.Errorf("machine %s is %s", m.Name, m.State)
		case m.Capacity.DiskBytes == 0:
			return fmt.Errorf("machine %s holds no volumes (no --zfs-parent)", m.Name)
		}
		return nil
	}
	if name := sp.Standby.Machine; name != "" {
		m, ok := s.MachineByName(name)
		if !ok {
			return "", fmt.Errorf("no machine named %q in the cluster", name)
		}
		if exists && old.StandbyID == m.ID {
			return m.ID, nil
		}
		return m.ID, can(m)
	}
	if exists && old.StandbyID != "" && old.StandbyID != owner {
		if m, ok := s.Machine(old.StandbyID); ok && m.State != fsm.MachineGone {
			return m.ID, nil
		}
	}
	var best *fsm.Machine
	for _, m := range s.Machines() {
		if can(m) != nil || !seen.alive[m.ID] {
			continue
		}
		if best == nil || m.Capacity.DiskBytes > best.Capacity.DiskBytes {
			m := m
			best = &m
		}
	}
	if best == nil {
		return "", errors.New("no other active, alive machine with volumes can keep its standby copy")
	}
	return best.ID, nil
}
