package standby

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
	"github.com/drover-sh/drover/volume"
)

func TestNewestCommonSnapshotIsTheBase(t *testing.T) {
	mine := []volume.Snapshot{{Name: "drover-standby-1", GUID: 1}, {Name: "drover-m1-final", GUID: 2}, {Name: "drover-standby-3", GUID: 3}, {Name: "drover-standby-4", GUID: 4}}
	if got := newestCommon(mine, []volume.Snapshot{{Name: "x", GUID: 1}, {Name: "y", GUID: 2}}, "drover-standby-4"); got != "drover-m1-final" {
		t.Fatalf("base %q", got)
	}
	if got := newestCommon(mine, nil, "drover-standby-4"); got != "" {
		t.Fatalf("no copy: base %q", got)
	}
	// A snapshot with the same name but another GUID is not common.
	if got := newestCommon(mine, []volume.Snapshot{{Name: "drover-standby-3", GUID: 99}}, "drover-standby-4"); got != "" {
		t.Fatalf("a name alone made a base: %q", got)
	}
}

// rig is a service shop/db owned by a with standby b.
func rig(t *testing.T, self string) (*Standby, *facttest.Store, *facttest.Members) {
	facts, members := facttest.NewStore(), facttest.NewMembers("a", "a", "b", "b")
	facts.AddMachine(t, "a", "a")
	facts.AddMachine(t, "b", "b")
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "t", Lease: time.Hour, At: time.Now()})
	spec := fsm.ServiceSpec{Name: "db", Image: "img", Volumes: []fsm.VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}},
		Standby: &fsm.StandbySpec{Interval: time.Second}}
	facts.Must(t, fsm.PutService{Namespace: "shop", Spec: spec, MachineID: "a", StandbyID: "b", Holder: "t", At: time.Now(), ServicePrefix: facttest.ServicePrefix})
	facts.Must(t, fsm.ReleaseLock{Namespace: "shop", Holder: "t", At: time.Now()})
	s := New(Config{Self: self, Name: self, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, facts, members, nil, nil, nil)
	return s, facts, members
}

func TestTheLeaseHoldsUntilItsStopMargin(t *testing.T) {
	s, facts, _ := rig(t, "a")
	sv := func() fsm.Service {
		var out fsm.Service
		facts.Read(func(st *fsm.State) { out, _ = st.Service("shop", "db") })
		return out
	}
	if s.Holds() || !s.Fenced(sv()) {
		t.Fatal("a machine that never renewed holds a lease")
	}
	// After a restart, the lease the facts record counts, minus the margin.
	facts.Must(t, fsm.RenewLease{MachineID: "a", Duration: fsm.StandbyLease, At: time.Now()})
	if !s.Holds() || s.Fenced(sv()) {
		t.Fatal("a fresh lease in the facts does not hold")
	}
	// Another machine's lease is not this one's.
	s3, facts3, _ := rig(t, "a")
	facts3.Must(t, fsm.RenewLease{MachineID: "b", Duration: fsm.StandbyLease, At: time.Now()})
	if s3.Holds() {
		t.Fatal("b's lease made a hold")
	}
	s2, facts2, _ := rig(t, "a")
	facts2.Must(t, fsm.RenewLease{MachineID: "a", Duration: fsm.StandbyLease, At: time.Now().Add(-fsm.StandbyLease + fsm.LeaseStopMargin - time.Millisecond)})
	if s2.Holds() {
		t.Fatal("a lease within its stop margin holds")
	}
	// A renewal this process saw committed holds by the monotonic clock.
	until := time.Now().Add(time.Second)
	s2.renewedUntil.Store(&until)
	if !s2.Holds() {
		t.Fatal("a renewal seen does not hold")
	}
}

func TestFailoverIsRefusedWhileTheOwnerMayServe(t *testing.T) {
	ctx := context.Background()
	s, facts, members := rig(t, "b")
	req := ctlapi.FailoverRequest{Service: "shop/db"}
	refused := func(want string) {
		t.Helper()
		_, err := s.Failover(ctx, req)
		var apiErr *ctlapi.APIError
		if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeFailoverRefused || !strings.Contains(err.Error(), want) {
			t.Fatalf("got %v, want refused with %q", err, want)
		}
	}
	refused("holds no copy yet")
	facts.Must(t, fsm.RecordReplica{Namespace: "shop", Name: "db", OwnerID: "a", StandbyID: "b", Snapshot: "drover-standby-1", TakenAt: time.Now(), At: time.Now()})
	refused("a runs shop/db and is alive: move it with droverctl migrate")
	members.Set("a", "a", cluster.LivenessFailed)
	facts.Must(t, fsm.RenewLease{MachineID: "a", Duration: fsm.StandbyLease, At: time.Now()})
	before := len(facts.Applied())
	refused("lease on shop/db runs")
	req.To = "a"
	refused("a is not the standby of shop/db (b is)")
	if n := len(facts.Applied()); n != before {
		t.Fatal("a refused failover changed the facts")
	}
}

// fakeVolumes records what the standby receives.
type fakeVolumes struct{ received []string }

func (f *fakeVolumes) Snapshot(ns, name, snap string) (volume.Snapshot, error) {
	return volume.Snapshot{Name: snap}, nil
}
func (f *fakeVolumes) Send(string, string, string, string, io.Writer) error { return nil }
func (f *fakeVolumes) Get(ns, name string) (volume.Info, error)             { return volume.Info{}, nil }
func (f *fakeVolumes) ReceiveStandby(ns, name, service string, incremental bool, r io.Reader) error {
	b, _ := io.ReadAll(r)
	f.received = append(f.received, fmt.Sprintf("%s/%s %s %v %s", ns, name, service, incremental, b))
	return nil
}
func (f *fakeVolumes) PruneStandbySnapshots(string, string, int) error { return nil }
func (f *fakeVolumes) SetAsideDiverged(string, string, string, string, time.Time) (string, uint64, error) {
	return "", 0, nil
}
func (f *fakeVolumes) StandbyOf(string, string) string { return "" }

func TestTheStandbyReceivesOnlyFromTheOwnerAndNeverOverADivergedCopy(t *testing.T) {
	_, facts, members := rig(t, "b")
	facts.AddMachine(t, "c", "c")
	net := peertest.New(t)
	a, b, c := net.Add("a"), net.Add("b"), net.Add("c")
	vols := &fakeVolumes{}
	sb := New(Config{Self: "b", Name: "b", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, facts, members, b, vols, nil)
	sb.Register(peer.Server{Mux: b, IDs: b})
	ctx := context.Background()
	req := receiveRequest{Namespace: "shop", Service: "db", Volume: "data", Snap: "drover-standby-2", Base: "drover-standby-1"}
	if _, err := routeReceive.Call(ctx, c, "b", req, strings.NewReader("stream")); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("a stream from c, which does not run db: %v", err)
	}
	if _, err := routeReceive.Call(ctx, a, "b", req, strings.NewReader("stream")); err != nil {
		t.Fatal(err)
	}
	if len(vols.received) != 1 || vols.received[0] != "shop/data shop/db true stream" {
		t.Fatalf("received %v", vols.received)
	}
	// b fails db over to itself, then a failover back makes b the old
	// owner with a copy not set aside: nothing is received over it.
	facts.Must(t, fsm.RecordReplica{Namespace: "shop", Name: "db", OwnerID: "a", StandbyID: "b", Snapshot: "s1", TakenAt: time.Now(), At: time.Now()})
	facts.Must(t, fsm.Failover{Namespace: "shop", Name: "db", To: "b", At: time.Now()})
	facts.Must(t, fsm.RecordReplica{Namespace: "shop", Name: "db", OwnerID: "b", StandbyID: "a", Snapshot: "s2", TakenAt: time.Now(), At: time.Now()})
	facts.Must(t, fsm.Failover{Namespace: "shop", Name: "db", To: "a", At: time.Now()})
	if _, err := routeReceive.Call(ctx, a, "b", req, strings.NewReader("stream")); !errors.Is(err, ErrInUse) {
		t.Fatalf("a stream over the diverged copy: %v", err)
	}
	if len(vols.received) != 1 {
		t.Fatalf("received over a diverged copy: %v", vols.received)
	}
}

func TestTheLeaderFailsOverByItselfOnceTheLeaseRanOut(t *testing.T) {
	s, facts, members := rig(t, "b")
	members.SetLeader(true)
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "t", Lease: time.Hour, At: time.Now()})
	spec := fsm.ServiceSpec{Name: "db", Image: "img", Volumes: []fsm.VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}},
		Standby: &fsm.StandbySpec{Interval: time.Second, Failover: fsm.FailoverAuto}}
	facts.Must(t, fsm.PutService{Namespace: "shop", Spec: spec, MachineID: "a", StandbyID: "b", Holder: "t", At: time.Now(), ServicePrefix: facttest.ServicePrefix})
	facts.Must(t, fsm.ReleaseLock{Namespace: "shop", Holder: "t", At: time.Now()})
	facts.Must(t, fsm.RecordReplica{Namespace: "shop", Name: "db", OwnerID: "a", StandbyID: "b", Snapshot: "s1", TakenAt: time.Now(), At: time.Now()})
	facts.Must(t, fsm.RenewLease{MachineID: "a", Duration: fsm.StandbyLease, At: time.Now().Add(-fsm.StandbyLease - fsm.ClockDriftMargin - time.Second)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.autoFailoverLoop(ctx) }()
	defer func() { cancel(); <-done }()
	time.Sleep(1500 * time.Millisecond)
	var sv fsm.Service
	facts.Read(func(st *fsm.State) { sv, _ = st.Service("shop", "db") })
	if sv.MachineID != "a" {
		t.Fatal("failed over while the owner is alive")
	}
	members.Set("a", "a", cluster.LivenessFailed)
	testpollUntil(t, 5*time.Second, func() bool {
		facts.Read(func(st *fsm.State) { sv, _ = st.Service("shop", "db") })
		return sv.MachineID == "b"
	})
}

func testpollUntil(t *testing.T, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("not within", within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestWakeWaitsForTheTickWhileBusyAndForTheFactsWhileIdle(t *testing.T) {
	ready := func() chan time.Time { c := make(chan time.Time, 1); c <- time.Now(); return c }
	closed := make(chan struct{})
	close(closed)

	// Both are ready, so a select that ignored busy would pick either.
	for range 20 {
		tick := ready()
		if !wake(context.Background(), false, tick, closed) || len(tick) != 1 {
			t.Fatal("an idle loop woke for its tick, not for the facts")
		}
		tick = ready()
		if !wake(context.Background(), true, tick, closed) || len(tick) != 0 {
			t.Fatal("a busy loop woke for the facts, not for its tick")
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if wake(ctx, false, nil, make(chan struct{})) || wake(ctx, true, make(chan time.Time), nil) {
		t.Fatal("wake went on after its context ended")
	}
}

func TestAMachineRenewsNoLeaseUntilTheFactsGiveItAServiceWithAStandby(t *testing.T) {
	s, facts, _ := rig(t, "c")
	facts.AddMachine(t, "c", "c")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	defer func() { cancel(); <-done }()

	renewals := func() int {
		n := 0
		for _, cmd := range facts.Applied() {
			if r, ok := cmd.(fsm.RenewLease); ok && r.MachineID == "c" {
				n++
			}
		}
		return n
	}
	// Another machine's service changes the facts: c still needs no lease.
	facts.Must(t, fsm.RenewLease{MachineID: "a", Duration: fsm.StandbyLease, At: time.Now()})
	time.Sleep(300 * time.Millisecond)
	if n := renewals(); n != 0 {
		t.Fatalf("a machine with no service with a standby renewed a lease %d times", n)
	}
	// c becomes the standby of a new service: the change wakes its loop.
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "t", Lease: time.Hour, At: time.Now()})
	spec := fsm.ServiceSpec{Name: "cache", Image: "img", Standby: &fsm.StandbySpec{Interval: time.Second}}
	facts.Must(t, fsm.PutService{Namespace: "shop", Spec: spec, MachineID: "a", StandbyID: "c", Holder: "t", At: time.Now(), ServicePrefix: facttest.ServicePrefix})
	testpollUntil(t, 5*time.Second, func() bool { return renewals() > 0 })
}
