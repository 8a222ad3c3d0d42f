// Package deploy applies a manifest: a plan computed from the facts (a
// pure function), its changes written under the namespace lock, then a
// wait until every changed service is ready. Moves in a manifest are
// handed to the migration package. See DESIGN.md.
package deploy

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/manifest"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/internal/nslock"
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
}

// Members is gossip's view of the machines.
type Members interface {
	Members() []cluster.Member
	Member(id string) (cluster.Member, bool)
}

// Images pins an image reference to the exact image every machine runs
// (runtime.Docker.Resolve).
type Images interface {
	Resolve(ctx context.Context, image string) (string, error)
}

// Puller has a machine's engine pull an image it lacks (images.Pusher).
type Puller interface {
	Pull(ctx context.Context, machineID, image string, onProgress func(runtime.PullProgress)) error
}

// Mover runs one migration, as `migrate apply` does.
type Mover interface {
	Migrate(ctx context.Context, req ctlapi.MigrateRequest, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error)
}

// Config is what a deployer needs to know of its machine.
type Config struct {
	Self          string // this machine's id
	Name          string // this machine's name: lock holders start with it
	ServicePrefix netip.Prefix
	LockLease     time.Duration
	// BindPrefixes are the host directories binds may come from.
	BindPrefixes []string
	Logger       *slog.Logger
	// Volumes destroys a volume's dataset on its owner (`deploy rm
	// --volumes`); nil: volumes are always kept.
	Volumes VolumeDestroyer
}

// Deployer plans and applies manifests.
type Deployer struct {
	cfg    Config
	facts  Facts
	gos    Members
	mover  Mover
	images Images // nil: images are not pinned
	puller Puller // nil: machines pull when they start a service
	log    *slog.Logger
}

// New makes a deployer.
func New(cfg Config, facts Facts, members Members, mover Mover, images Images, puller Puller) *Deployer {
	return &Deployer{cfg: cfg, facts: facts, gos: members, mover: mover, images: images, puller: puller, log: cfg.Logger}
}

func badManifest(err error) error {
	return &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadManifest, Err: err}
}

// Preview shows what a manifest would change. It changes nothing.
func (d *Deployer) Preview(ctx context.Context, req ctlapi.DeployRequest) (ctlapi.DeployPlan, error) {
	p, _, err := d.plan(ctx, req, map[string]string{})
	return p, err
}

// plan parses the manifest, pins its images (pinned caches them across
// the plans of one request) and plans it against the current facts.
func (d *Deployer) plan(ctx context.Context, req ctlapi.DeployRequest, pinned map[string]string) (ctlapi.DeployPlan, []change, error) {
	file := req.File
	if file == "" {
		file = "manifest"
	}
	m, err := manifest.ParseWith(file, []byte(req.Manifest), manifest.Options{BindPrefixes: d.cfg.BindPrefixes})
	if err != nil {
		return ctlapi.DeployPlan{}, nil, badManifest(err)
	}
	if err := d.pin(ctx, file, m, pinned); err != nil {
		return ctlapi.DeployPlan{}, nil, err
	}
	alive := map[string]bool{}
	cores := map[string]uint64{}
	for _, g := range d.gos.Members() {
		alive[g.MachineID] = g.Liveness == cluster.LivenessAlive || g.Liveness == cluster.LivenessSuspect
		cores[g.MachineID] = g.MilliCPUs
	}
	var p ctlapi.DeployPlan
	var changes []change
	d.facts.Read(func(s *fsm.State) { p, changes, err = planChanges(s, machineView{alive: alive, cores: cores}, file, m) })
	return p, changes, err
}

// Apply applies a manifest under the namespace lock and waits until every
// service it changed is ready, or one failed.
func (d *Deployer) Apply(ctx context.Context, req ctlapi.DeployRequest, emit func(ctlapi.DeployEvent)) (ctlapi.DeployResult, error) {
	if emit == nil {
		emit = func(ctlapi.DeployEvent) {}
	}
	pinned := map[string]string{}
	p, changes, err := d.plan(ctx, req, pinned)
	if err != nil {
		return ctlapi.DeployResult{}, err
	}
	for _, c := range changes {
		if level, key := levelKey(c.spec); key != "" && !c.remove {
			if ok, old := factview.FactsAt(d.facts, d.gos, level); !ok {
				return ctlapi.DeployResult{Plan: p}, badManifest(fmt.Errorf("%s: service %s uses %s, which machine %s (a droverd older than this one, or not seen) cannot read: upgrade every machine first",
					req.File, c.spec.Name, key, old))
			}
		}
	}
	if moves := movesOf(changes); len(moves) > 0 {
		if len(moves) != len(changes) {
			return ctlapi.DeployResult{Plan: p}, badManifest(fmt.Errorf(
				"%s: the manifest moves services and changes others: deploy the changes and the moves separately", req.File))
		}
		return d.move(ctx, p, moves)
	}
	holder := d.cfg.Name + "/deploy/" + randomSuffix()
	lock, err := nslock.Acquire(ctx, d.facts, p.Namespace, holder, d.cfg.LockLease, d.log)
	if err != nil {
		return ctlapi.DeployResult{Plan: p}, err
	}
	defer lock.Release()
	// Plan again under the lock: the facts may have changed meanwhile.
	p, changes, err = d.plan(ctx, req, pinned)
	if err != nil {
		return ctlapi.DeployResult{Plan: p}, err
	}
	cmds := make([]fsm.Command, len(changes))
	for i, c := range changes {
		cmds[i] = fsm.PutService{Namespace: p.Namespace, Holder: holder, Spec: c.spec,
			MachineID: c.machineID, StandbyID: c.standbyID, ServicePrefix: d.cfg.ServicePrefix, At: time.Now()}
		if c.remove {
			cmds[i] = fsm.RemoveService{Namespace: p.Namespace, Name: c.spec.Name, Holder: holder, At: time.Now()}
		}
		// Every command is checked before the first is written: a deploy
		// with one too large changes nothing.
		data, err := fsm.Encode(cmds[i])
		if err != nil {
			return ctlapi.DeployResult{Plan: p}, fmt.Errorf("service %s/%s: %w", p.Namespace, c.spec.Name, err)
		}
		if len(data) > cluster.MaxCommandBytes {
			field, size := largestField(c.spec)
			return ctlapi.DeployResult{Plan: p}, &ctlapi.APIError{Status: http.StatusRequestEntityTooLarge, Code: ctlapi.CodeTooLarge, Err: fmt.Errorf(
				"service %s/%s: its spec encodes to %d KiB (%s alone %d KiB), over the fact store's limit of %d KiB per command: %w",
				p.Namespace, c.spec.Name, len(data)>>10, field, size>>10, cluster.MaxCommandBytes>>10, cluster.ErrCommandTooLarge)}
		}
	}
	if err := d.pullImages(ctx, p.Namespace, changes, emit); err != nil {
		return ctlapi.DeployResult{Plan: p}, err
	}
	for i, cmd := range cmds {
		if _, err := d.facts.Apply(ctx, cmd); err != nil {
			return ctlapi.DeployResult{Plan: p}, fmt.Errorf("deploying %s/%s: %w", p.Namespace, changes[i].spec.Name, err)
		}
	}
	if err := d.waitReady(ctx, p.Namespace, changes, emit); err != nil {
		return ctlapi.DeployResult{Plan: p}, err
	}
	return ctlapi.DeployResult{Plan: p, Services: d.servicesOf(p.Namespace)}, nil
}

// move performs a manifest's moves: each is the migration `migrate
// apply` runs (pre-flight, its own hold of the namespace lock, warm copy,
// commit), one after the other; the first that fails ends the deploy.
func (d *Deployer) move(ctx context.Context, p ctlapi.DeployPlan, moves []change) (ctlapi.DeployResult, error) {
	res := ctlapi.DeployResult{Plan: p}
	for _, c := range moves {
		target := factview.NameOf(d.gos, d.facts, c.machineID)
		info, err := d.mover.Migrate(ctx, ctlapi.MigrateRequest{Service: p.Namespace + "/" + c.spec.Name, To: target}, func(ctlapi.MigrationEvent) {})
		if info.ID != "" {
			res.Migrations = append(res.Migrations, info)
		}
		if err != nil {
			return res, fmt.Errorf("moving %s/%s to %s: %w", p.Namespace, c.spec.Name, target, err)
		}
	}
	res.Services = d.servicesOf(p.Namespace)
	return res, nil
}

// VolumeDestroyer has a volume's owner destroy its dataset, for the
// holder of the namespace's lock (servicectl.Services).
type VolumeDestroyer interface {
	DestroyVolume(ctx context.Context, ns, name, holder string) error
}

// Remove removes every service of a namespace, under its lock: the
// machines that run them stop and remove their containers (their
// reconcilers, within a tick), and free the service IPs. The volumes stay,
// owned where they are, for a later deploy of the namespace — unless
// withVolumes: then each owner destroys its dataset and the volume is
// forgotten.
func (d *Deployer) Remove(ctx context.Context, ns string, withVolumes bool) (ctlapi.RemoveResult, error) {
	if withVolumes {
		if d.cfg.Volumes == nil {
			return ctlapi.RemoveResult{}, errors.New("this daemon cannot destroy volumes")
		}
		if ok, old := factview.FactsAt(d.facts, d.gos, cluster.FactsLevelCutover); !ok {
			return ctlapi.RemoveResult{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeBadRequest,
				Err: fmt.Errorf("removing volumes needs every machine upgraded: %s runs an older droverd (or is not seen)", old)}
		}
	}
	if len(d.servicesOf(ns)) == 0 && !withVolumes {
		return ctlapi.RemoveResult{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService,
			Err: fmt.Errorf("namespace %q has no services", ns)}
	}
	holder := d.cfg.Name + "/deploy-rm/" + randomSuffix()
	lock, err := nslock.Acquire(ctx, d.facts, ns, holder, d.cfg.LockLease, d.log)
	if err != nil {
		return ctlapi.RemoveResult{}, err
	}
	defer lock.Release()
	res := ctlapi.RemoveResult{Namespace: ns}
	for _, s := range d.servicesOf(ns) { // again, under the lock
		if _, err := d.facts.Apply(ctx, fsm.RemoveService{Namespace: ns, Name: s.Name, Holder: holder, At: time.Now()}); err != nil {
			return res, fmt.Errorf("removing %s/%s: %w", ns, s.Name, err)
		}
		res.Services = append(res.Services, s.Name+" (on "+s.Machine+")")
	}
	var vols []fsm.Volume
	d.facts.Read(func(s *fsm.State) {
		for _, v := range s.Volumes() {
			if v.Namespace == ns {
				vols = append(vols, v)
			}
		}
	})
	for _, v := range vols {
		owner := factview.NameOf(d.gos, d.facts, v.OwnerID)
		if !withVolumes {
			res.VolumesKept = append(res.VolumesKept, v.Name+" (on "+owner+")")
			continue
		}
		// The dataset first: a fact without a dataset is made again by the
		// next deploy; a dataset without a fact would be forgotten.
		if err := d.cfg.Volumes.DestroyVolume(ctx, ns, v.Name, holder); err != nil {
			return res, err
		}
		if _, err := d.facts.Apply(ctx, fsm.RemoveVolume{Namespace: ns, Name: v.Name, Holder: holder, At: time.Now()}); err != nil {
			return res, fmt.Errorf("forgetting volume %s/%s: %w", ns, v.Name, err)
		}
		res.VolumesDestroyed = append(res.VolumesDestroyed, v.Name+" (on "+owner+")")
	}
	if len(res.Services) == 0 && len(res.VolumesDestroyed) == 0 {
		return res, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService,
			Err: fmt.Errorf("namespace %q has no services and no volumes", ns)}
	}
	return res, nil
}

// levelKey names the first key of spec that needs a facts level above 1
// (cluster.FactsLevel) and that level, or none.
func levelKey(spec fsm.ServiceSpec) (uint32, string) {
	switch {
	case spec.Standby != nil:
		return cluster.FactsLevelStandby, "standby"
	case spec.Restart != "":
		return cluster.FactsLevelOperator, "restart"
	case spec.Health != nil:
		return cluster.FactsLevelOperator, "health"
	case spec.MilliCPUs != 0:
		return cluster.FactsLevelOperator, "cpus"
	case len(spec.Secrets) > 0:
		return cluster.FactsLevelOperator, "secrets"
	}
	if key := level2Key(spec); key != "" {
		return cluster.FactsLevelCutover, key
	}
	return 0, ""
}

// level2Key names the first key of spec that needs facts level 2, or
// none.
func level2Key(spec fsm.ServiceSpec) string {
	switch {
	case len(spec.Flush) > 0:
		return "flush"
	case len(spec.Entrypoint) > 0:
		return "entrypoint"
	case spec.User != "":
		return "user"
	case spec.WorkingDir != "":
		return "working_dir"
	case len(spec.Labels) > 0:
		return "labels"
	case spec.ReadOnly:
		return "read_only"
	case len(spec.Tmpfs) > 0:
		return "tmpfs"
	}
	for _, v := range spec.Volumes {
		if v.RecordSize != 0 {
			return "recordsize"
		}
		if v.Compression != "" {
			return "compression"
		}
	}
	return ""
}

// servicesOf lists the services of a namespace.
func (d *Deployer) servicesOf(ns string) []ctlapi.Service {
	var out []ctlapi.Service
	for _, s := range d.Services() {
		if s.Namespace == ns {
			out = append(out, s)
		}
	}
	return out
}

// waitReady waits until every created or changed service reports ready
// for its new generation; the first failure ends the wait with the
// service, its machine and the reason.
func (d *Deployer) waitReady(ctx context.Context, ns string, changes []change, emit func(ctlapi.DeployEvent)) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	told := map[string]string{} // service -> the last kind emitted
	for {
		var waiting []string
		var failed error
		var events []ctlapi.DeployEvent
		d.facts.Read(func(s *fsm.State) {
			waiting, failed = readiness(s, ns, changes)
			for _, c := range changes {
				sv, ok := s.Service(ns, c.spec.Name)
				if c.remove || !ok {
					continue
				}
				kind := "waiting"
				if sv.Status.Generation == sv.Generation && sv.Status.Ready {
					kind = "ready"
				}
				if told[c.spec.Name] != kind {
					told[c.spec.Name] = kind
					events = append(events, ctlapi.DeployEvent{Time: time.Now(), Service: ns + "/" + c.spec.Name, Machine: s.NameOf(sv.MachineID), Kind: kind})
				}
			}
		})
		for _, ev := range events {
			emit(ev)
		}
		if failed != nil {
			return &ctlapi.APIError{Status: http.StatusUnprocessableEntity, Code: ctlapi.CodeServiceFailed, Err: failed}
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

// readiness says which changed services are not ready yet, or the first
// that failed: a pure function of the facts.
func readiness(s *fsm.State, ns string, changes []change) (waiting []string, failed error) {
	for _, c := range changes {
		if c.remove {
			continue
		}
		sv, ok := s.Service(ns, c.spec.Name)
		if !ok {
			continue
		}
		mname := s.NameOf(c.machineID)
		switch {
		case sv.Status.Generation == sv.Generation && sv.Status.Ready:
		case sv.Status.Generation == sv.Generation && sv.Status.Error != "":
			return nil, fmt.Errorf("service %s/%s failed on %s: %s", ns, c.spec.Name, mname, sv.Status.Error)
		default:
			waiting = append(waiting, c.spec.Name+" on "+mname)
		}
	}
	return waiting, nil
}

// Services lists every service with where it runs and whether it is ready.
func (d *Deployer) Services() []ctlapi.Service {
	var out []ctlapi.Service
	d.facts.Read(func(s *fsm.State) {
		for _, sv := range s.Services() {
			row := ctlapi.Service{Namespace: sv.Namespace, Name: sv.Spec.Name, ServiceIP: sv.ServiceIP.String(),
				Generation: sv.Generation, Machine: s.NameOf(sv.MachineID), State: "starting"}
			for _, sm := range sv.Spec.Secrets {
				row.Secrets = append(row.Secrets, sm.Name)
			}
			if sv.Spec.Standby != nil {
				row.Standby = &ctlapi.Standby{Machine: s.NameOf(sv.StandbyID), Failover: cmp.Or(sv.Spec.Standby.Failover, fsm.FailoverManual)}
				if r := sv.Replica; r != nil {
					row.Standby.Snapshot, row.Standby.TakenAt, row.Standby.LastBytes = r.Snapshot, r.TakenAt, r.Bytes
					row.Standby.Lag = ctlapi.Duration(time.Since(r.TakenAt))
				}
			}
			if f := sv.LastFailover; f != nil {
				row.LastFailoverAt = f.At
				row.LastFailover = fmt.Sprintf("%s -> %s at %s from %s (loss window %s)", s.NameOf(f.From), s.NameOf(f.To),
					f.At.UTC().Format(time.RFC3339), f.Snapshot, f.At.Sub(f.TakenAt).Round(time.Millisecond))
				if f.Settled {
					row.LastFailover += fmt.Sprintf("; %s had written %d bytes after it, kept as %s", s.NameOf(f.From), f.DivergedBytes, strings.Join(f.KeptAs, ", "))
				}
			}
			if sv.Status.Generation == sv.Generation {
				row.Process, row.Restarts = sv.Status.State, sv.Status.Restarts
				if e := sv.Status.LastExit; e != nil {
					row.LastExit = &ctlapi.Exit{Code: e.Code, At: e.At, Reason: e.Reason}
				}
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
	return out
}

// RenderManifest gives the manifest that moves a service: its namespace's
// services as they are, with the service placed on the target and its
// volumes marked to move. `deploy -f` with it runs the migration.
func (d *Deployer) RenderManifest(_ context.Context, req ctlapi.MigrateRequest) (ctlapi.RenderedManifest, error) {
	ns, name, err := factview.SplitService(req.Service)
	if err != nil {
		return ctlapi.RenderedManifest{}, err
	}
	target, err := factview.MachineByName(d.facts, d.cfg.Self, req.To)
	if err != nil {
		return ctlapi.RenderedManifest{}, err
	}
	var specs []fsm.ServiceSpec
	found := false
	d.facts.Read(func(s *fsm.State) {
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
		return ctlapi.RenderedManifest{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService, Err: fmt.Errorf("no service %s", req.Service)}
	}
	return ctlapi.RenderedManifest{Namespace: ns, Text: manifest.Render(ns, specs, map[string]bool{name: true})}, nil
}

// largestField names the field of a spec whose encoding is the largest,
// and its size: what an operator trims when a spec is too large.
func largestField(spec fsm.ServiceSpec) (string, int) {
	raw, err := json.Marshal(spec)
	if err != nil {
		return "?", 0
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return "?", 0
	}
	name, size := "?", 0
	for k, v := range fields {
		if len(v) > size || len(v) == size && k < name {
			name, size = k, len(v)
		}
	}
	return name, size
}

// pin sets each service's ImageRef: the digest its registry has for the
// image, or the id of the local image for one in no registry. An image
// that cannot be pinned fails the deploy before anything changes, naming
// the file, the service, the image and the registry.
func (d *Deployer) pin(ctx context.Context, file string, m *manifest.Manifest, pinned map[string]string) error {
	if d.images == nil {
		return nil
	}
	var problems manifest.Errors
	for i, sp := range m.Services {
		ref, ok := pinned[sp.Image]
		if !ok {
			var err error
			if ref, err = d.images.Resolve(ctx, sp.Image); err != nil {
				problems = append(problems, &manifest.Error{File: file, Key: "services." + sp.Name + ".image", Msg: err.Error()})
				continue
			}
			pinned[sp.Image] = ref
		}
		m.Services[i].ImageRef = ref
	}
	if len(problems) > 0 {
		return &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadImage, Err: problems}
	}
	return nil
}

// pullImages has each machine that will run a changed service get its
// pinned image before any fact is written, passing the engines' progress
// on: a deploy whose image a machine cannot get fails naming both, and
// changes nothing; the container then starts without waiting for a pull.
func (d *Deployer) pullImages(ctx context.Context, ns string, changes []change, emit func(ctlapi.DeployEvent)) error {
	if d.puller == nil {
		return nil
	}
	for _, c := range changes {
		if c.remove || c.migrate {
			continue
		}
		image, machine := c.spec.RunImage(), d.nameOf(c.machineID)
		err := d.puller.Pull(ctx, c.machineID, image, func(pp runtime.PullProgress) {
			emit(ctlapi.DeployEvent{Time: time.Now(), Service: ns + "/" + c.spec.Name, Machine: machine, Kind: "pull",
				Message: pp.Status, Layer: pp.Layer, Bytes: pp.Current, Total: pp.Total})
		})
		if err != nil {
			return &ctlapi.APIError{Status: http.StatusBadGateway, Code: ctlapi.CodePullFailed,
				Err: fmt.Errorf("service %s/%s: machine %s cannot get image %s: %w", ns, c.spec.Name, machine, image, err)}
		}
	}
	return nil
}

func (d *Deployer) nameOf(id string) string {
	name := id
	d.facts.Read(func(s *fsm.State) { name = s.NameOf(id) })
	return name
}
