package standby

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
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
	facts.Must(t, fsm.RenewLease{MachineID: "b", Duration: fsm.StandbyLease, At: time.Now()}) // another's lease is not ours
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
