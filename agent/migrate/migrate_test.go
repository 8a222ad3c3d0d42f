package migrate

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

func phasesOf(events []ctlapi.MigrationEvent) []string {
	var out []string
	for _, ev := range events {
		if ev.Kind == "phase" && (len(out) == 0 || out[len(out)-1] != ev.Phase) {
			out = append(out, ev.Phase)
		}
	}
	return out
}

func TestMigrationMovesServiceAndVolumeThenRollsBack(t *testing.T) {
	c := newCluster(t, "a", "b", "c")
	sv := c.deploy("a")
	a, b := c.m["a"], c.m["b"]
	var events []ctlapi.MigrationEvent
	info, err := c.m["c"].mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ev ctlapi.MigrationEvent) { events = append(events, ev) })
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	if info.Phase != "done" || info.Executor != "c" || info.Source != "a" || info.Target != "b" {
		t.Fatalf("migration %+v", info)
	}
	want := []string{"warm-copy", "source-stopped", "target-starting", "committed", "done"}
	if got := phasesOf(events); !slices.Equal(got, want) {
		t.Fatalf("phases %v, want %v", got, want)
	}
	// The downtime is broken down and recorded; the copies went in place
	// before the stop, so none was adopted during it.
	if info.Cutover == nil || info.Cutover.Total <= 0 || info.Cutover.Adopt != 0 || info.Cutover.Total < info.Cutover.Stop+info.Cutover.Commit {
		t.Fatalf("cutover breakdown %+v", info.Cutover)
	}
	// The target held its container started and released it at the
	// cutover.
	if !info.Cutover.Held || len(b.rt.released) != 1 {
		t.Fatalf("held %v, released %v", info.Cutover.Held, b.rt.released)
	}
	if c.owner() != "b" || c.service().MachineID != "b" || c.lockHolder() != "" {
		t.Fatalf("after the move: owner %s, service on %s, lock %q", c.owner(), c.service().MachineID, c.lockHolder())
	}
	final := finalSnapshot(info.ID)
	// Both sides keep only the final snapshot of drover's (and the user's).
	for _, m := range []*machine{a, b} {
		if got := m.vols.snapNames(m.vols.Dataset("shop", "data")); !slices.Equal(got, []string{"user-snap", final}) {
			t.Errorf("%s keeps snapshots %v, want user-snap and %s", m.id, got, final)
		}
	}
	if _, ok := a.rt.container("shop", "web"); ok || a.lo.has(sv.ServiceIP) {
		t.Error("the source still has the container or the service IP")
	}
	if ctr, ok := b.rt.container("shop", "web"); !ok || !ctr.Running || !b.lo.has(sv.ServiceIP) {
		t.Error("the target does not run the service on its IP")
	}
	if got := b.vols.Origin("shop", "data"); got != info.ID {
		t.Errorf("target copy marked %q, want %s", got, info.ID)
	}
	if staging, _ := b.vols.Staging(); len(staging) != 0 {
		t.Errorf("staging left on the target: %v", staging)
	}

	// Rolling back sends only what changed since the kept copy.
	back, err := c.m["c"].mig.Rollback(context.Background(), info.ID, func(ctlapi.MigrationEvent) {})
	if err != nil {
		t.Fatalf("rollback: %v", err)
	}
	if back.RollbackOf != info.ID || back.Phase != "done" || c.owner() != "a" || back.Volumes[0].Base != final {
		t.Fatalf("rollback %+v; owner %s", back, c.owner())
	}
	// A rollback of the rollback's origin is refused now: it has moved.
	if _, err := c.m["c"].mig.Rollback(context.Background(), info.ID, nil); !isCode(err, ctlapi.CodeNoRollback) || !strings.Contains(err.Error(), "has moved since") {
		t.Fatalf("second rollback: %v", err)
	}
}

func isCode(err error, code string) bool {
	var apiErr *ctlapi.APIError
	return errors.As(err, &apiErr) && apiErr.Code == code
}

func TestMigrationAbortsWhenTheTargetNeverGetsReady(t *testing.T) {
	c := newCluster(t, "a", "b")
	sv := c.deploy("a")
	a, b := c.m["a"], c.m["b"]
	b.rt.failReady = errors.New("readiness: connection refused")
	info, err := a.mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ctlapi.MigrationEvent) {})
	if !isCode(err, ctlapi.CodeMigrationAborted) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("migrate: %v", err)
	}
	m := c.migration(info.ID)
	if m.Phase != fsm.PhaseAborted || !strings.Contains(m.Error, "connection refused") {
		t.Fatalf("facts say %s (%q)", m.Phase, m.Error)
	}
	if c.owner() != "a" || c.lockHolder() != "" {
		t.Fatalf("owner %s, lock %q", c.owner(), c.lockHolder())
	}
	if ctr, ok := a.rt.container("shop", "web"); !ok || !ctr.Running || len(a.rt.stopped) != 1 {
		t.Fatalf("the source's container is not running again (stopped %v)", a.rt.stopped)
	}
	if _, ok := b.rt.container("shop", "web"); ok || b.lo.has(sv.ServiceIP) {
		t.Fatal("the target kept the container or the service IP")
	}
	if names := b.vols.names(); len(names) != 0 {
		t.Fatalf("the target kept datasets %v", names)
	}
}

// movedToB deploys shop/web on a and moves it to b: a keeps its copy.
func movedToB(t *testing.T) (*testCluster, ctlapi.MigrationInfo) {
	t.Helper()
	c := newCluster(t, "a", "b")
	c.deploy("a")
	first, err := c.m["a"].mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ctlapi.MigrationEvent) {})
	if err != nil {
		t.Fatal(err)
	}
	return c, first
}

func TestAbortGivesBackTheCopyAMoveBackStartedFrom(t *testing.T) {
	c, first := movedToB(t)
	a, b := c.m["a"], c.m["b"]
	kept := a.vols.Dataset("shop", "data")
	before := a.vols.snapNames(kept)
	a.rt.failReady = errors.New("not ready")
	_, err := b.mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "a"}, func(ctlapi.MigrationEvent) {})
	if !isCode(err, ctlapi.CodeMigrationAborted) {
		t.Fatalf("move back: %v", err)
	}
	if got := a.vols.snapNames(kept); !a.vols.Exists(kept) || !slices.Contains(got, finalSnapshot(first.ID)) {
		t.Fatalf("the copy kept on a is gone after the abort (had %v, has %v)", before, got)
	}
	if staging, _ := a.vols.Staging(); len(staging) != 0 {
		t.Fatalf("staging left: %v", staging)
	}
	if c.owner() != "b" {
		t.Fatalf("owner %s after an aborted move back", c.owner())
	}
}

func TestStalledStreamIsNamedOnTheExecutor(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	unblock := make(chan struct{})
	defer close(unblock)
	c.m["a"].mig.d.Streams = stallingStreams{Streams: c.m["a"].vols, unblock: unblock}
	_, err := c.m["a"].mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ctlapi.MigrationEvent) {})
	if !errors.Is(err, ErrStalled) || !isCode(err, ctlapi.CodeMigrationAborted) {
		t.Fatalf("migrate: %v; want an abort for a stalled stream", err)
	}
}

// stallingStreams sends the stream's header, then nothing until unblocked
// or the stream is torn down; with healed set, it sends as the volumes do.
type stallingStreams struct {
	Streams
	unblock chan struct{}
	healed  *atomic.Bool
}

func (s stallingStreams) Send(ns, vol, snap, base string, w io.Writer) error {
	if s.healed != nil && s.healed.Load() {
		return s.Streams.Send(ns, vol, snap, base, w)
	}
	if _, err := w.Write([]byte(`{"snaps":[]}` + "\n")); err != nil {
		return err
	}
	for {
		select {
		case <-s.unblock:
			return nil
		case <-time.After(20 * time.Millisecond):
		}
		if _, err := w.Write(nil); err != nil {
			return err
		}
	}
}

// The source is stopped with the service's stop_timeout as its grace,
// and a container that had to be killed at its end is reported.
func TestSourceStopsWithTheServiceGraceAndAKillIsReported(t *testing.T) {
	c := newCluster(t, "a", "b")
	spec := webSpec()
	spec.StopTimeout = 42 * time.Second
	sv := c.facts.Deploy(t, "shop", spec, "a")
	a := c.m["a"]
	a.vols.create(a.vols.Dataset("shop", "data"), "user-snap")
	if _, err := a.rt.Start(context.Background(), runtimeSpec(sv)); err != nil {
		t.Fatal(err)
	}
	a.lo.Add(sv.ServiceIP)
	a.rt.killOnStop = true
	var events []ctlapi.MigrationEvent
	if _, err := c.m["b"].mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ev ctlapi.MigrationEvent) { events = append(events, ev) }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a.rt.graces, []time.Duration{42 * time.Second}) {
		t.Fatalf("the source was stopped with graces %v, want the service's 42s", a.rt.graces)
	}
	warned := slices.ContainsFunc(events, func(ev ctlapi.MigrationEvent) bool {
		return ev.Kind == "warning" && strings.Contains(ev.Message, "was killed") && strings.Contains(ev.Message, "42s")
	})
	if !warned {
		t.Fatalf("no warning that the source was killed in %+v", events)
	}
}

// A target without the service's pinned image pulls it before the source
// stops; one that cannot get it fails pre-flight, saying why.
func TestTargetPullsThePinnedImageBeforeTheSourceStops(t *testing.T) {
	c := newCluster(t, "a", "b", "c")
	spec := webSpec()
	spec.ImageRef = "reg.example:5000/web@sha256:" + strings.Repeat("1", 64)
	sv := c.facts.Deploy(t, "shop", spec, "a")
	a := c.m["a"]
	a.vols.create(a.vols.Dataset("shop", "data"), "user-snap")
	if _, err := a.rt.Start(context.Background(), runtimeSpec(sv)); err != nil {
		t.Fatal(err)
	}
	a.lo.Add(sv.ServiceIP)

	plan, err := c.m["a"].mig.Preview(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "c"})
	if err != nil {
		t.Fatal(err)
	}
	if plan.OK || !slices.ContainsFunc(plan.Checks, func(ch ctlapi.MigrationCheck) bool {
		return ch.Name == "image on target" && !ch.OK && strings.Contains(ch.Detail, "manifest unknown")
	}) {
		t.Fatalf("pre-flight to a target that cannot get the image: %+v", plan.Checks)
	}

	c.m["b"].rt.pullable[spec.ImageRef] = true
	var events []ctlapi.MigrationEvent
	if _, err := c.m["a"].mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ev ctlapi.MigrationEvent) { events = append(events, ev) }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.m["b"].rt.pulled, []string{spec.ImageRef}) {
		t.Fatalf("the target pulled %v", c.m["b"].rt.pulled)
	}
	pulled := slices.IndexFunc(events, func(ev ctlapi.MigrationEvent) bool { return ev.Kind == "image" })
	stopped := slices.IndexFunc(events, func(ev ctlapi.MigrationEvent) bool { return ev.Phase == string(fsm.PhaseSourceStopped) })
	if pulled < 0 || stopped < 0 || pulled > stopped {
		t.Fatalf("the pull (event %d) did not come before the source stopped (event %d): %+v", pulled, stopped, events)
	}
}

// A target that cannot pull the image gets it from the source over the
// mesh before the source stops; pre-flight says so. A target with
// neither fails pre-flight.
func TestSourceStreamsTheImageATargetCannotPull(t *testing.T) {
	c := newCluster(t, "a", "b")
	spec := webSpec()
	spec.ImageRef = "sha256:" + strings.Repeat("2", 64) // a local image, in no registry
	sv := c.facts.Deploy(t, "shop", spec, "a")
	a, b := c.m["a"], c.m["b"]
	a.vols.create(a.vols.Dataset("shop", "data"), "user-snap")
	a.rt.images[spec.ImageRef] = true
	if _, err := a.rt.Start(context.Background(), runtimeSpec(sv)); err != nil {
		t.Fatal(err)
	}
	a.lo.Add(sv.ServiceIP)

	plan, err := a.mig.Preview(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if !plan.OK || !slices.ContainsFunc(plan.Checks, func(ch ctlapi.MigrationCheck) bool {
		return ch.Name == "image on target" && ch.OK && strings.Contains(ch.Detail, "streamed from a over the mesh")
	}) {
		t.Fatalf("pre-flight: %+v", plan.Checks)
	}
	var events []ctlapi.MigrationEvent
	if _, err := a.mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "b"}, func(ev ctlapi.MigrationEvent) { events = append(events, ev) }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(b.rt.loaded, []string{spec.ImageRef}) || len(b.rt.pulled) != 0 {
		t.Fatalf("the target loaded %v and pulled %v", b.rt.loaded, b.rt.pulled)
	}
	streamed := slices.IndexFunc(events, func(ev ctlapi.MigrationEvent) bool {
		return ev.Kind == "image" && strings.Contains(ev.Message, "streamed from the source")
	})
	stopped := slices.IndexFunc(events, func(ev ctlapi.MigrationEvent) bool { return ev.Phase == string(fsm.PhaseSourceStopped) })
	if streamed < 0 || stopped < 0 || streamed > stopped {
		t.Fatalf("the stream (event %d) did not come before the source stopped (event %d)", streamed, stopped)
	}

	// Back to a, which has it; then to c, which has it nowhere to come from.
	delete(b.rt.images, spec.ImageRef)
	plan, _ = b.mig.Preview(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "a"})
	if !plan.OK {
		t.Fatalf("a move back to a that has the image: %+v", plan.Checks)
	}
}

// A stream of an image into a target is accepted from the migration's
// source only.
func TestImageStreamFromAnotherMachineIsRefused(t *testing.T) {
	c := newCluster(t, "a", "b", "c")
	c.deploy("a")
	c.orphan("m1", "b", "a/migrate/m1", fsm.PhaseWarmCopy)
	_, err := routeLoadImage.Call(context.Background(), c.m["c"].host, "b", migrationRef{ID: "m1"}, strings.NewReader("image:"+testImage))
	if !errors.Is(err, ErrStreamRefused) {
		t.Fatalf("an image stream from c (not the source): %v", err)
	}
	if len(c.m["b"].rt.loaded) != 0 {
		t.Fatal("the target loaded what c sent")
	}
}

// A service with a flush command has it run in its source container once,
// before the last warm round, and one more round follows it.
func TestFlushRunsOnceBeforeTheLastRound(t *testing.T) {
	c := newCluster(t, "a", "b")
	spec := webSpec()
	spec.Flush = []string{"psql", "-c", "CHECKPOINT"}
	sv := c.facts.Deploy(t, "shop", spec, "a")
	a := c.m["a"]
	a.vols.create(a.vols.Dataset("shop", "data"), "user-snap")
	if _, err := a.rt.Start(context.Background(), runtimeSpec(sv)); err != nil {
		t.Fatal(err)
	}
	var events []ctlapi.MigrationEvent
	info, err := a.mig.Migrate(context.Background(), migrateTo("b"), func(ev ctlapi.MigrationEvent) { events = append(events, ev) })
	if err != nil || info.Phase != "done" {
		t.Fatalf("migrate: %v %+v", err, info)
	}
	if len(a.rt.execs) != 1 || !slices.Equal(a.rt.execs[0], spec.Flush) {
		t.Fatalf("flush runs on the source: %v", a.rt.execs)
	}
	rounds, flushedAt := 0, -1
	for _, ev := range events {
		switch {
		case strings.HasPrefix(ev.Message, "round "):
			rounds++
		case strings.HasPrefix(ev.Message, "service flushed"):
			flushedAt = rounds
		}
	}
	if flushedAt < 1 || rounds != flushedAt+1 {
		t.Fatalf("flushed after round %d of %d: want one round after the flush", flushedAt, rounds)
	}
}

// A target that cannot hold containers creates the container before the
// stop and starts it at the cutover.
func TestATargetThatCannotHoldStartsAtTheCutover(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	c.m["b"].rt.noHold = true
	info, err := c.m["a"].mig.Migrate(context.Background(), migrateTo("b"), func(ctlapi.MigrationEvent) {})
	if err != nil || info.Phase != "done" || info.Cutover == nil || info.Cutover.Held {
		t.Fatalf("migrate: %v %+v", err, info)
	}
	ctr, ok := c.m["b"].rt.container("shop", "web")
	if !ok || !ctr.Running || ctr.Held || len(c.m["b"].rt.released) != 0 {
		t.Fatalf("target container %+v (found %v), released %v", ctr, ok, c.m["b"].rt.released)
	}
}

// While a machine runs a daemon that cannot read a move's breakdown, the
// move does not record it (that daemon would halt on the field).
func TestTheBreakdownIsNotRecordedWhileAMachineIsOlder(t *testing.T) {
	c := newCluster(t, "a", "b", "c")
	c.deploy("a")
	c.members.SetFactsLevel("c", 1)
	info, err := c.m["a"].mig.Migrate(context.Background(), migrateTo("b"), func(ctlapi.MigrationEvent) {})
	if err != nil || info.Phase != "done" || info.Cutover != nil {
		t.Fatalf("migrate: %v, phase %s, cutover %+v", err, info.Phase, info.Cutover)
	}
}

// An aborted move throws away the snapshots it took on both machines (kept,
// they pin space and slow every read of the volume); a target that was
// not told keeps them, and the next move from the base rolls them back
// there before it receives.
func TestAnAbortLeavesNoSnapshotOfItsOwnAndTheNextMoveStartsFromTheBase(t *testing.T) {
	c, first := movedToB(t)
	a, b := c.m["a"], c.m["b"]
	snaps := func(v *fakeVolumes) []string { return v.snapNames(v.Dataset("shop", "data")) }
	ownSnapshots := func(v *fakeVolumes, id string) []string {
		return slices.DeleteFunc(snaps(v), func(s string) bool { return !strings.HasPrefix(s, snapshotsOf(id)) })
	}
	a.rt.failReady = errors.New("not ready")
	aborted, err := b.mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "a"}, func(ctlapi.MigrationEvent) {})
	if !isCode(err, ctlapi.CodeMigrationAborted) {
		t.Fatalf("move back: %v", err)
	}
	for name, v := range map[string]*fakeVolumes{"a (target)": a.vols, "b (source)": b.vols} {
		if left := ownSnapshots(v, aborted.ID); len(left) != 0 {
			t.Fatalf("%s keeps the aborted move's snapshots %v", name, left)
		}
		if !slices.Contains(snaps(v), finalSnapshot(first.ID)) {
			t.Fatalf("%s lost the base %s: %v", name, finalSnapshot(first.ID), snaps(v))
		}
	}
	// As if a had been down during the abort: its copy still holds a
	// snapshot newer than the base, which b no longer has.
	if _, err := a.vols.Snapshot("shop", "data", snapshotsOf(aborted.ID)+"1"); err != nil {
		t.Fatal(err)
	}
	a.rt.failReady = nil
	again, err := b.mig.Migrate(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "a"}, func(ctlapi.MigrationEvent) {})
	if err != nil {
		t.Fatalf("the move after the abort: %v", err)
	}
	if c.owner() != "a" || again.Volumes[0].BytesSent >= first.Volumes[0].BytesSent {
		t.Fatalf("owner %s; sent %d bytes, the first full move %d: not from the base", c.owner(), again.Volumes[0].BytesSent, first.Volumes[0].BytesSent)
	}
}
