package deploy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/manifest"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

type fakeMover struct{ asked []string }

func (f *fakeMover) Migrate(_ context.Context, req ctlapi.MigrateRequest, _ func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	f.asked = append(f.asked, req.Service+"->"+req.To)
	return ctlapi.MigrationInfo{ID: "m1", Phase: "done"}, nil
}

// fakePuller records pulls and fails the images it is told to.
type fakePuller struct {
	mu     sync.Mutex
	pulled []string
	fail   map[string]error
}

func (f *fakePuller) Pull(_ context.Context, machineID, image string, onProgress func(runtime.PullProgress)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail[image]; err != nil {
		return err
	}
	onProgress(runtime.PullProgress{Layer: "l1", Status: "Downloading", Current: 5, Total: 10})
	f.pulled = append(f.pulled, machineID+":"+image)
	return nil
}

// fakeImages pins every image to a digest, except the ones it refuses.
type fakeImages struct {
	refuse   map[string]error
	resolved []string
}

func (f *fakeImages) Resolve(_ context.Context, image string) (string, error) {
	f.resolved = append(f.resolved, image)
	if err := f.refuse[image]; err != nil {
		return "", err
	}
	return "reg.example/" + image + "@sha256:abcd", nil
}

type rig struct {
	facts   *facttest.Store
	members *facttest.Members
	mover   *fakeMover
	images  *fakeImages
	puller  *fakePuller
	d       *Deployer
}

func newRig(t *testing.T) *rig {
	g := &rig{facts: facttest.NewStore(), members: facttest.NewMembers("a", "a", "b", "b", "c", "c"), mover: &fakeMover{}, images: &fakeImages{refuse: map[string]error{}}, puller: &fakePuller{fail: map[string]error{}}}
	for _, m := range []string{"a", "b", "c"} {
		g.facts.AddMachine(t, m, m)
	}
	// b has the most free volume space; c is not alive.
	g.facts.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "b", Name: "b", Capacity: fsm.Capacity{MemoryBytes: 1 << 30, DiskBytes: 50 << 30}}, At: facttest.T0})
	g.facts.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: "c", Name: "c", Capacity: fsm.Capacity{MemoryBytes: 1 << 30, DiskBytes: 90 << 30}}, At: facttest.T0})
	g.members.Set("c", "c", cluster.LivenessFailed)
	g.d = New(Config{Self: "a", Name: "a", ServicePrefix: facttest.ServicePrefix, LockLease: time.Minute,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, g.facts, g.members, g.mover, g.images, g.puller)
	return g
}

// reportStatus plays the owning machines' reconcilers until ctx ends:
// each new generation is reported ready when ready(name), else failed.
func (g *rig) reportStatus(ctx context.Context, ready func(name string) bool) {
	go func() {
		for ctx.Err() == nil {
			var todo []fsm.Service
			g.facts.Read(func(s *fsm.State) {
				for _, sv := range s.Services() {
					if sv.Status.Generation != sv.Generation {
						todo = append(todo, sv)
					}
				}
			})
			for _, sv := range todo {
				ok, msg := ready(sv.Spec.Name), ""
				if !ok {
					msg = "exec check: exit 1"
				}
				g.facts.Apply(ctx, fsm.SetServiceStatus{Namespace: sv.Namespace, Name: sv.Spec.Name, MachineID: sv.MachineID,
					Generation: sv.Generation, Ready: ok, Error: msg, At: time.Now()})
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
}

const webManifest = `namespace = "shop"

[services.web]
image = "img:1"

[[services.web.ports]]
port = 80
target = 8080

[[services.web.volumes]]
name = "data"
path = "/data"
quota = "1GiB"

[services.web.readiness]
http = "/healthz"
`

// withMachine is webManifest placing web on machine.
func withMachine(machine string) string {
	return strings.Replace(webManifest, "image = \"img:1\"\n", "image = \"img:1\"\nmachine = \""+machine+"\"\n", 1)
}

func planned(p ctlapi.DeployPlan) map[string]ctlapi.PlannedService {
	out := map[string]ctlapi.PlannedService{}
	for _, s := range p.Services {
		out[s.Name] = s
	}
	return out
}

func TestPreviewPlacesCreatesChangesAndRemoves(t *testing.T) {
	g := newRig(t)
	p, err := g.d.Preview(context.Background(), ctlapi.DeployRequest{File: "shop.toml", Manifest: webManifest + "\n[services.cron]\nimage = \"img:1\"\nmachine = \"a\"\n"})
	if err != nil {
		t.Fatal(err)
	}
	s := planned(p)
	if s["web"].Action != "create" || s["web"].Machine != "b" || s["web"].PlacementNote != "most free space" || len(s["web"].CreateVolumes) != 1 {
		t.Fatalf("web %+v: want created on b, the alive machine with most space", s["web"])
	}
	if s["cron"].Machine != "a" || !strings.Contains(strings.Join(p.Warnings, ";"), "cron has no readiness check") {
		t.Fatalf("cron %+v, warnings %v", s["cron"], p.Warnings)
	}
	if len(g.facts.Applied()) != 5 {
		t.Fatal("a preview changed the facts")
	}

	g.facts.Deploy(t, "shop", fsm.ServiceSpec{Name: "old", Image: "img:1"}, "a")
	web := g.facts.Deploy(t, "shop", webSpecOf(t, g), "b")
	changed := strings.Replace(webManifest, `image = "img:1"`, `image = "img:2"`, 1)
	p, err = g.d.Preview(context.Background(), ctlapi.DeployRequest{Manifest: changed})
	if err != nil {
		t.Fatal(err)
	}
	s = planned(p)
	if s["web"].Action != "change" || strings.Join(s["web"].Changes, ",") != "image" || s["web"].Generation != web.Generation+1 {
		t.Fatalf("changed web %+v", s["web"])
	}
	if s["old"].Action != "remove" || !strings.Contains(strings.Join(p.Warnings, ";"), "old is not in the manifest") {
		t.Fatalf("old %+v", s["old"])
	}
	if p, _ = g.d.Preview(context.Background(), ctlapi.DeployRequest{Manifest: webManifest + "\n[services.old]\nimage = \"img:1\"\n"}); planned(p)["web"].Action != "unchanged" {
		t.Fatalf("the same manifest reads as %+v", planned(p)["web"])
	}
}

// webSpecOf is web as the manifest has it.
func webSpecOf(t *testing.T, g *rig) fsm.ServiceSpec {
	p, changes, err := g.d.plan(context.Background(), ctlapi.DeployRequest{Manifest: webManifest}, map[string]string{})
	if err != nil || len(changes) == 0 {
		t.Fatalf("planning web: %+v %v", p, err)
	}
	return changes[0].spec
}

func TestBadManifestsNameFileAndKeyAndChangeNothing(t *testing.T) {
	g := newRig(t)
	g.facts.Deploy(t, "shop", webSpecOf(t, g), "b")
	before := len(g.facts.Applied())
	for _, c := range []struct{ manifest, want string }{
		{"namespace = \"shop\"\n[services.web]\nimage = 3\n", "shop.toml"},
		{withMachine("zz"), `services.web.machine: no machine named "zz"`},
		{withMachine("a"), "moving it is a migration"},
		{strings.Replace(withMachine("a"), `quota = "1GiB"`, "quota = \"1GiB\"\nmove = true", 1) + "\n[services.api]\nimage = \"img:1\"\n", "moves services and changes others"},
	} {
		_, err := g.d.Apply(context.Background(), ctlapi.DeployRequest{File: "shop.toml", Manifest: c.manifest}, nil)
		var apiErr *ctlapi.APIError
		if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeBadManifest || !strings.Contains(err.Error(), c.want) {
			t.Errorf("manifest %q: %v; want bad_manifest naming %q", c.manifest, err, c.want)
		}
	}
	if len(g.facts.Applied()) != before || len(g.mover.asked) != 0 {
		t.Fatalf("refused manifests changed facts or moved %v", g.mover.asked)
	}
}

func TestApplyWaitsForReadinessAndNamesAFailure(t *testing.T) {
	g := newRig(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The machine's reconciler, as far as readiness goes: web gets ready,
	// api fails.
	g.reportStatus(ctx, func(name string) bool { return name == "web" })
	var told []string
	res, err := g.d.Apply(ctx, ctlapi.DeployRequest{Manifest: webManifest}, func(ev ctlapi.DeployEvent) {
		told = append(told, ev.Kind+" "+ev.Service+" on "+ev.Machine)
	})
	if err != nil || len(res.Services) != 1 || res.Services[0].State != "ready" || res.Services[0].Machine != "b" {
		t.Fatalf("deploy %+v, %v", res, err)
	}
	if strings.Join(told, ", ") != "pull shop/web on b, waiting shop/web on b, ready shop/web on b" {
		t.Fatalf("progress told: %v", told)
	}
	_, err = g.d.Apply(ctx, ctlapi.DeployRequest{Manifest: webManifest + "\n[services.api]\nimage = \"img:1\"\nmachine = \"a\"\n"}, nil)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeServiceFailed || !strings.Contains(err.Error(), "shop/api failed on a: exec check: exit 1") {
		t.Fatalf("failing deploy: %v", err)
	}
	var held bool
	g.facts.Read(func(s *fsm.State) { _, held = s.Lock("shop") })
	if held {
		t.Fatal("the lock is still held after the deploy")
	}
}

func TestApplyIntoALockedNamespaceNamesTheHolder(t *testing.T) {
	g := newRig(t)
	g.facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "b/migrate/m9", Lease: time.Minute, At: time.Now()})
	_, err := g.d.Apply(context.Background(), ctlapi.DeployRequest{Manifest: webManifest}, nil)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeNamespaceLocked || !strings.Contains(err.Error(), "b/migrate/m9") || !errors.Is(err, fsm.ErrLockHeld) {
		t.Fatalf("deploy into a locked namespace: %v", err)
	}
}

func TestMovesByManifestGoToTheMigrationAndRenderRoundTrips(t *testing.T) {
	g := newRig(t)
	g.facts.Deploy(t, "shop", webSpecOf(t, g), "b")
	r, err := g.d.RenderManifest(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "a"})
	if err != nil || !strings.Contains(r.Text, `machine = "a"`) || !strings.Contains(r.Text, "move = true") {
		t.Fatalf("rendered %q, %v", r.Text, err)
	}
	res, err := g.d.Apply(context.Background(), ctlapi.DeployRequest{Manifest: r.Text}, nil)
	if err != nil || strings.Join(g.mover.asked, ",") != "shop/web->a" || len(res.Migrations) != 1 {
		t.Fatalf("deploy of the rendered manifest: %+v %v (moves %v)", res, err, g.mover.asked)
	}
	for _, bad := range []ctlapi.MigrateRequest{{Service: "shopweb", To: "a"}, {Service: "shop/nope", To: "a"}, {Service: "shop/web", To: "zz"}} {
		if _, err := g.d.RenderManifest(context.Background(), bad); err == nil {
			t.Errorf("rendered %+v", bad)
		}
	}
}

func TestAManifestTooLargeForTheFactStoreChangesNothing(t *testing.T) {
	g := newRig(t)
	before := len(g.facts.Applied())
	var ports strings.Builder
	for i := range 20000 {
		fmt.Fprintf(&ports, "\n[[services.api.ports]]\nport = %d\n", 1000+i)
	}
	m := webManifest + "\n[services.api]\nimage = \"img:1\"\nmachine = \"a\"\n" + ports.String()
	_, err := g.d.Apply(context.Background(), ctlapi.DeployRequest{File: "big.toml", Manifest: m}, nil)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeTooLarge || !strings.Contains(err.Error(), "service shop/api") || !strings.Contains(err.Error(), "512 KiB") || !strings.Contains(err.Error(), "ports alone") {
		t.Fatalf("too large a manifest: %v", err)
	}
	var held bool
	g.facts.Read(func(s *fsm.State) { _, held = s.Lock("shop") })
	if applied := g.facts.Applied(); len(applied) != before+2 || held { // the lock, taken and given back
		t.Fatalf("a refused deploy wrote %v", applied[before:])
	}
}

// A deploy pins each image once, shows tag -> digest in its plan and
// stores the pin; an image that cannot be pinned changes nothing and
// names the file, the service and the image's error.
func TestDeployPinsImagesAndRefusesOnesItCannotPin(t *testing.T) {
	g := newRig(t)
	p, err := g.d.Preview(context.Background(), ctlapi.DeployRequest{File: "shop.toml", Manifest: webManifest})
	if err != nil {
		t.Fatal(err)
	}
	if p.Services[0].Image != "img:1" || p.Services[0].ImageRef != "reg.example/img:1@sha256:abcd" {
		t.Fatalf("plan %+v", p.Services[0])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	g.reportStatus(ctx, func(string) bool { return true })
	g.images.resolved = nil
	if _, err := g.d.Apply(ctx, ctlapi.DeployRequest{File: "shop.toml", Manifest: webManifest}, nil); err != nil {
		t.Fatal(err)
	}
	if len(g.images.resolved) != 1 {
		t.Fatalf("one deploy resolved %v", g.images.resolved)
	}
	var sv fsm.Service
	g.facts.Read(func(s *fsm.State) { sv, _ = s.Service("shop", "web") })
	if sv.Spec.RunImage() != "reg.example/img:1@sha256:abcd" {
		t.Fatalf("stored spec runs %q", sv.Spec.RunImage())
	}

	before := len(g.facts.Applied())
	g.images.refuse["img:2"] = errors.New("image cannot be resolved to a digest: image img:2, registry docker.io, from machine a: unauthorized")
	_, err = g.d.Apply(ctx, ctlapi.DeployRequest{File: "shop.toml", Manifest: strings.Replace(webManifest, "img:1", "img:2", 1)}, nil)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeBadImage || !strings.Contains(err.Error(), "shop.toml") ||
		!strings.Contains(err.Error(), "services.web.image") || !strings.Contains(err.Error(), "unauthorized") {
		t.Fatalf("an image that cannot be pinned: %v", err)
	}
	if len(g.facts.Applied()) != before {
		t.Fatalf("a refused deploy wrote %v", g.facts.Applied()[before:])
	}
}

// The machine that will run a service gets its image before any fact is
// written, and the deploy passes its progress on; a machine that cannot
// get it fails the deploy naming both, and nothing changes.
func TestDeployPullsOnTheMachineFirst(t *testing.T) {
	g := newRig(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	g.reportStatus(ctx, func(string) bool { return true })
	var events []ctlapi.DeployEvent
	if _, err := g.d.Apply(ctx, ctlapi.DeployRequest{File: "shop.toml", Manifest: webManifest}, func(ev ctlapi.DeployEvent) { events = append(events, ev) }); err != nil {
		t.Fatal(err)
	}
	if len(g.puller.pulled) != 1 || g.puller.pulled[0] != "b:reg.example/img:1@sha256:abcd" {
		t.Fatalf("pulled %v", g.puller.pulled)
	}
	if len(events) == 0 || events[0].Kind != "pull" || events[0].Machine != "b" || events[0].Service != "shop/web" || events[0].Total != 10 {
		t.Fatalf("events %+v", events)
	}

	before := len(g.facts.Applied())
	g.puller.fail["reg.example/img:3@sha256:abcd"] = errors.New("image pull failed: unauthorized")
	_, err := g.d.Apply(ctx, ctlapi.DeployRequest{File: "shop.toml", Manifest: strings.Replace(webManifest, "img:1", "img:3", 1)}, nil)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodePullFailed || !strings.Contains(err.Error(), "machine b") || !strings.Contains(err.Error(), "unauthorized") {
		t.Fatalf("a pull that fails: %v", err)
	}
	if applied := g.facts.Applied(); len(applied) != before+2 { // the lock, taken and given back
		t.Fatalf("a deploy whose pull failed wrote %v", applied[before:])
	}
}

// deploy rm removes every service of the namespace under its lock and
// keeps the volumes where they are; a namespace without services, or a
// locked one, is refused.
func TestRemoveANamespaceKeepsItsVolumes(t *testing.T) {
	g := newRig(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g.reportStatus(ctx, func(string) bool { return true })
	if _, err := g.d.Apply(ctx, ctlapi.DeployRequest{Manifest: webManifest}, nil); err != nil {
		t.Fatal(err)
	}
	g.facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "b/migrate/m9", Lease: time.Minute, At: time.Now()})
	var apiErr *ctlapi.APIError
	if _, err := g.d.Remove(ctx, "shop", false); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeNamespaceLocked {
		t.Fatalf("remove while locked: %v", err)
	}
	g.facts.Must(t, fsm.ReleaseLock{Namespace: "shop", Holder: "b/migrate/m9", At: time.Now()})
	res, err := g.d.Remove(ctx, "shop", false)
	if err != nil || len(res.Services) != 1 || !strings.HasPrefix(res.Services[0], "web (on b)") || len(res.VolumesKept) != 1 || res.VolumesKept[0] != "data (on b)" {
		t.Fatalf("remove: %+v, %v", res, err)
	}
	var services, volumes int
	var held bool
	g.facts.Read(func(s *fsm.State) {
		services, volumes = len(s.Services()), len(s.Volumes())
		_, held = s.Lock("shop")
	})
	if services != 0 || volumes != 1 || held {
		t.Fatalf("after the remove: %d services, %d volumes, lock held %v", services, volumes, held)
	}
	if _, err := g.d.Remove(ctx, "shop", false); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeUnknownService || !strings.Contains(err.Error(), `"shop" has no services`) {
		t.Fatalf("remove of an empty namespace: %v", err)
	}
}

// A manifest key an older daemon cannot read is refused, naming the key
// and the machine, while any machine is older; nothing changes.
func TestKeysNewerThanAMachineAreRefused(t *testing.T) {
	g := newRig(t)
	g.members.SetFactsLevel("b", 1)
	mf := strings.Replace(webManifest, `quota = "1GiB"`, "quota = \"1GiB\"\nrecordsize = \"8K\"", 1)
	_, err := g.d.Apply(context.Background(), ctlapi.DeployRequest{Manifest: mf}, nil)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeBadManifest || !strings.Contains(err.Error(), "uses recordsize") || !strings.Contains(err.Error(), "machine b") {
		t.Fatalf("deploy with a newer key: %v", err)
	}
	var services int
	g.facts.Read(func(s *fsm.State) { services = len(s.Services()) })
	if services != 0 {
		t.Fatalf("%d services after a refused deploy", services)
	}
}

// fakeDestroyer records the volumes it was asked to destroy.
type fakeDestroyer struct{ destroyed []string }

func (f *fakeDestroyer) DestroyVolume(_ context.Context, ns, name, holder string) error {
	f.destroyed = append(f.destroyed, ns+"/"+name+" by "+holder[:strings.Index(holder, "/")])
	return nil
}

// deploy rm --volumes has each owner destroy its dataset, then forgets
// the volume; refused while a machine is older.
func TestRemoveANamespaceWithItsVolumes(t *testing.T) {
	g := newRig(t)
	dest := &fakeDestroyer{}
	g.d.cfg.Volumes = dest
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g.reportStatus(ctx, func(string) bool { return true })
	if _, err := g.d.Apply(ctx, ctlapi.DeployRequest{Manifest: webManifest}, nil); err != nil {
		t.Fatal(err)
	}
	g.members.SetFactsLevel("c", 1)
	if _, err := g.d.Remove(ctx, "shop", true); err == nil || !strings.Contains(err.Error(), "c runs an older droverd") || len(dest.destroyed) != 0 {
		t.Fatalf("remove --volumes with an older machine: %v (destroyed %v)", err, dest.destroyed)
	}
	g.members.SetFactsLevel("c", 2)
	res, err := g.d.Remove(ctx, "shop", true)
	if err != nil || len(res.VolumesDestroyed) != 1 || res.VolumesDestroyed[0] != "data (on b)" || len(res.VolumesKept) != 0 {
		t.Fatalf("remove --volumes: %+v, %v", res, err)
	}
	if len(dest.destroyed) != 1 || dest.destroyed[0] != "shop/data by a" {
		t.Fatalf("destroyed %v", dest.destroyed)
	}
	var volumes int
	g.facts.Read(func(s *fsm.State) { volumes = len(s.Volumes()) })
	if volumes != 0 {
		t.Fatalf("%d volumes left in the facts", volumes)
	}
}

func TestPlacementCountsTheCoresServicesReserve(t *testing.T) {
	facts := facttest.NewStore()
	facts.AddMachine(t, "a", "a")
	facts.AddMachine(t, "b", "b")
	busy := fsm.ServiceSpec{Name: "busy", Image: "img:1", MilliCPUs: 1500}
	facts.Deploy(t, "shop", busy, "a")
	seen := machineView{alive: map[string]bool{"a": true, "b": true}, cores: map[string]uint64{"a": 2000, "b": 1000}}
	plan := func(src string) (ctlapi.DeployPlan, error) {
		m, err := manifest.Parse("shop.toml", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		var p ctlapi.DeployPlan
		facts.Read(func(s *fsm.State) { p, _, err = planChanges(s, seen, "shop.toml", m) })
		return p, err
	}
	head := "namespace = \"shop\"\n[services.busy]\nimage = \"img:1\"\ncpus = 1.5\n"
	// a has 0.5 of its 2 cores left, b 1: a service asking 1 goes to b.
	p, err := plan(head + "[services.job]\nimage = \"img:1\"\ncpus = 1\n")
	if err != nil || planned(p)["job"].Machine != "b" {
		t.Fatalf("job placed %+v, %v; want b", planned(p)["job"], err)
	}
	// Asking a for it names the shortage; asking 2 cores fits nowhere.
	_, err = plan(head + "[services.job]\nimage = \"img:1\"\ncpus = 1\nmachine = \"a\"\n")
	if err == nil || !strings.Contains(err.Error(), "machine a has 2 cores, 1.5 reserved by its services: job asks 1") {
		t.Fatalf("job on a: %v", err)
	}
	_, err = plan(head + "[services.job]\nimage = \"img:1\"\ncpus = 2\n")
	if err == nil || !strings.Contains(err.Error(), "no machine has the cores") {
		t.Fatalf("job of 2 cores: %v", err)
	}
	// Raising busy's own reservation counts only the new figure.
	if _, err := plan("namespace = \"shop\"\n[services.busy]\nimage = \"img:1\"\ncpus = 2\n"); err != nil {
		t.Fatalf("busy to 2 cores on a 2-core machine: %v", err)
	}
}

// TestEveryFieldOfASpecIsAChange: a manifest that changes any key of a
// service is a change the deploy writes (only the placement and the
// name are not: a move, another service).
func TestEveryFieldOfASpecIsAChange(t *testing.T) {
	typ := reflect.TypeOf(fsm.ServiceSpec{})
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		if f.Name == "Machine" || f.Name == "Name" {
			continue
		}
		var changed fsm.ServiceSpec
		v := reflect.ValueOf(&changed).Elem().Field(i)
		switch v.Kind() {
		case reflect.String:
			v.SetString("x")
		case reflect.Bool:
			v.SetBool(true)
		case reflect.Int, reflect.Int64:
			v.SetInt(1)
		case reflect.Uint64:
			v.SetUint(1)
		case reflect.Slice:
			v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		case reflect.Map:
			m := reflect.MakeMap(v.Type())
			m.SetMapIndex(reflect.ValueOf("k"), reflect.ValueOf("v"))
			v.Set(m)
		case reflect.Pointer:
			v.Set(reflect.New(v.Type().Elem()))
		default:
			t.Fatalf("field %s: kind %s not covered by this test", f.Name, v.Kind())
		}
		if len(specChanges(fsm.ServiceSpec{}, changed)) == 0 {
			t.Errorf("a change of %s is not seen as a change", f.Name)
		}
	}
}
