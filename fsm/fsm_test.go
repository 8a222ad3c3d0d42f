package fsm

import (
	"bytes"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

// apply encodes c and applies it through the wire path.
func apply(t *testing.T, s *State, c Command) (any, error) {
	t.Helper()
	b, err := Encode(c)
	if err != nil {
		t.Fatalf("encode %T: %v", c, err)
	}
	return s.Apply(b)
}

func mustApply(t *testing.T, s *State, c Command) any {
	t.Helper()
	res, err := apply(t, s, c)
	if err != nil {
		t.Fatalf("%T: %v", c, err)
	}
	return res
}

func snapshotBytes(t *testing.T, s *State) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := s.WriteSnapshot(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// expectRule applies c, wants a rule error matching code and no change.
func expectRule(t *testing.T, s *State, c Command, code *RuleError) *RuleError {
	t.Helper()
	before := snapshotBytes(t, s)
	_, err := apply(t, s, c)
	var rule *RuleError
	if !errors.Is(err, code) || !errors.As(err, &rule) {
		t.Fatalf("%T: got %v, want %s", c, err, code.Code)
	}
	if !bytes.Equal(before, snapshotBytes(t, s)) {
		t.Fatalf("%T changed the state although it broke a rule", c)
	}
	return rule
}

func machine(id, name string) Machine {
	return Machine{ID: id, Name: name, GossipAddr: "10.0.0.1:7946", RaftAddr: "10.0.0.1:7947", RPCAddr: "10.0.0.1:7948",
		Capacity: Capacity{MemoryBytes: 1 << 30, DiskBytes: 10 << 30}}
}

func TestRegisterMachine(t *testing.T) {
	s := NewState()
	m := mustApply(t, s, RegisterMachine{Machine: machine("a1", "alpha"), At: t0}).(Machine)
	if m.State != MachineActive || !m.RegisteredAt.Equal(t0) {
		t.Fatalf("new machine: %+v", m)
	}
	// An update keeps state, overlay IP and registration time.
	mustApply(t, s, SetMachineState{ID: "a1", State: MachineDraining, At: t0})
	mustApply(t, s, AllocateOverlayIP{MachineID: "a1", Prefix: netip.MustParsePrefix("10.210.0.0/16"), At: t0})
	upd := machine("a1", "alpha")
	upd.GossipAddr = "10.0.0.9:7946"
	upd.State = MachineGone                         // ignored
	upd.OverlayIP = netip.MustParseAddr("10.9.9.9") // ignored
	m = mustApply(t, s, RegisterMachine{Machine: upd, At: t0.Add(time.Minute)}).(Machine)
	if m.State != MachineDraining || m.OverlayIP != netip.MustParseAddr("10.210.0.1") || m.GossipAddr != "10.0.0.9:7946" ||
		!m.RegisteredAt.Equal(t0) || !m.UpdatedAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("updated machine: %+v", m)
	}
	expectRule(t, s, RegisterMachine{Machine: machine("b2", "alpha"), At: t0}, ErrNameTaken)
	expectRule(t, s, RegisterMachine{Machine: machine("B2", "beta"), At: t0}, ErrInvalid)
	expectRule(t, s, RegisterMachine{Machine: machine("b2", "-beta"), At: t0}, ErrInvalid)
	expectRule(t, s, RegisterMachine{Machine: machine("b2", "../x"), At: t0}, ErrInvalid)
	if got, ok := s.MachineByName("alpha"); !ok || got.ID != "a1" {
		t.Fatalf("by name: %+v %v", got, ok)
	}
}

func TestSetStateAndRemoveMachine(t *testing.T) {
	s := NewState()
	mustApply(t, s, RegisterMachine{Machine: machine("a1", "alpha"), At: t0})
	expectRule(t, s, SetMachineState{ID: "zz", State: MachineDrained, At: t0}, ErrUnknownMachine)
	expectRule(t, s, SetMachineState{ID: "a1", State: "sleeping", At: t0}, ErrInvalid)
	if m := mustApply(t, s, SetMachineState{ID: "a1", State: MachineDrained, At: t0}).(Machine); m.State != MachineDrained {
		t.Fatalf("state %s", m.State)
	}
	expectRule(t, s, RemoveMachine{ID: "zz", At: t0}, ErrUnknownMachine)
	mustApply(t, s, RemoveMachine{ID: "a1", At: t0})
	if _, ok := s.Machine("a1"); ok {
		t.Fatal("machine still there after RemoveMachine")
	}
}

func TestLocks(t *testing.T) {
	s := NewState()
	l := mustApply(t, s, AcquireLock{Namespace: "web", Holder: "alice", Lease: time.Minute, At: t0}).(Lock)
	if !l.ExpiresAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("lock %+v", l)
	}
	// Another holder is refused and told who holds it, since when.
	rule := expectRule(t, s, AcquireLock{Namespace: "web", Holder: "bob", Lease: time.Minute, At: t0.Add(30 * time.Second)}, ErrLockHeld)
	if rule.Holder != "alice" || !rule.Since.Equal(t0) {
		t.Fatalf("rule error %+v", rule)
	}
	// The same holder extends, keeping the acquisition time.
	l = mustApply(t, s, AcquireLock{Namespace: "web", Holder: "alice", Lease: time.Minute, At: t0.Add(30 * time.Second)}).(Lock)
	if !l.AcquiredAt.Equal(t0) || !l.ExpiresAt.Equal(t0.Add(90*time.Second)) {
		t.Fatalf("extended lock %+v", l)
	}
	l = mustApply(t, s, RenewLock{Namespace: "web", Holder: "alice", Lease: 2 * time.Minute, At: t0.Add(time.Minute)}).(Lock)
	if !l.ExpiresAt.Equal(t0.Add(3 * time.Minute)) {
		t.Fatalf("renewed lock %+v", l)
	}
	expectRule(t, s, RenewLock{Namespace: "web", Holder: "bob", Lease: time.Minute, At: t0.Add(time.Minute)}, ErrLockNotHeld)
	expectRule(t, s, ReleaseLock{Namespace: "web", Holder: "bob", At: t0}, ErrLockNotHeld)
	// After its lease, another holder gets it.
	l = mustApply(t, s, AcquireLock{Namespace: "web", Holder: "bob", Lease: time.Minute, At: t0.Add(3 * time.Minute)}).(Lock)
	if l.Holder != "bob" || !l.AcquiredAt.Equal(t0.Add(3*time.Minute)) {
		t.Fatalf("lock after expiry %+v", l)
	}
	// An expired lock cannot be renewed.
	expectRule(t, s, RenewLock{Namespace: "web", Holder: "bob", Lease: time.Minute, At: t0.Add(10 * time.Minute)}, ErrLockNotHeld)
	mustApply(t, s, ReleaseLock{Namespace: "web", Holder: "bob", At: t0})
	mustApply(t, s, ReleaseLock{Namespace: "web", Holder: "bob", At: t0}) // free: no-op
	for _, bad := range []AcquireLock{
		{Namespace: "Web", Holder: "a", Lease: time.Minute},
		{Namespace: "web", Holder: "", Lease: time.Minute},
		{Namespace: "web", Holder: "a", Lease: 0},
		{Namespace: "web", Holder: "a", Lease: 2 * MaxLease},
	} {
		expectRule(t, s, bad, ErrInvalid)
	}
}

func TestExpireLocks(t *testing.T) {
	s := NewState()
	mustApply(t, s, AcquireLock{Namespace: "a", Holder: "h", Lease: time.Minute, At: t0})
	mustApply(t, s, AcquireLock{Namespace: "b", Holder: "h", Lease: time.Hour, At: t0})
	expired := mustApply(t, s, ExpireLocks{At: t0.Add(time.Minute)}).([]Lock)
	if len(expired) != 1 || expired[0].Namespace != "a" {
		t.Fatalf("expired %+v", expired)
	}
	if _, ok := s.Lock("a"); ok {
		t.Fatal("expired lock still held")
	}
	if _, ok := s.Lock("b"); !ok {
		t.Fatal("live lock was expired")
	}
}

func TestOverlayAllocation(t *testing.T) {
	s := NewState()
	p := netip.MustParsePrefix("10.1.2.0/30") // hosts .1 and .2 only
	for _, id := range []string{"a", "b", "c"} {
		mustApply(t, s, RegisterMachine{Machine: machine(id, "m-"+id), At: t0})
	}
	a := mustApply(t, s, AllocateOverlayIP{MachineID: "a", Prefix: p, At: t0}).(netip.Addr)
	again := mustApply(t, s, AllocateOverlayIP{MachineID: "a", Prefix: p, At: t0}).(netip.Addr)
	b := mustApply(t, s, AllocateOverlayIP{MachineID: "b", Prefix: p, At: t0}).(netip.Addr)
	if a.String() != "10.1.2.1" || again != a || b.String() != "10.1.2.2" {
		t.Fatalf("allocated a=%s again=%s b=%s", a, again, b)
	}
	expectRule(t, s, AllocateOverlayIP{MachineID: "c", Prefix: p, At: t0}, ErrOverlayExhausted)
	expectRule(t, s, AllocateOverlayIP{MachineID: "zz", Prefix: p, At: t0}, ErrUnknownMachine)
	expectRule(t, s, AllocateOverlayIP{MachineID: "c", Prefix: netip.MustParsePrefix("10.1.2.1/30"), At: t0}, ErrInvalid)
	expectRule(t, s, AllocateOverlayIP{MachineID: "c", Prefix: netip.MustParsePrefix("10.1.2.1/32"), At: t0}, ErrInvalid)
	mustApply(t, s, RemoveMachine{ID: "a", At: t0})
	if c := mustApply(t, s, AllocateOverlayIP{MachineID: "c", Prefix: p, At: t0}).(netip.Addr); c != a {
		t.Fatalf("freed address not reused: got %s, want %s", c, a)
	}
}

// history is a log that touches every command type.
func history() []Command {
	return []Command{
		RegisterMachine{Machine: machine("a1", "alpha"), At: t0},
		RegisterMachine{Machine: machine("b2", "beta"), At: t0},
		AllocateOverlayIP{MachineID: "a1", Prefix: netip.MustParsePrefix("10.210.0.0/16"), At: t0},
		SetMachineState{ID: "b2", State: MachineDraining, At: t0},
		AcquireLock{Namespace: "web", Holder: "alpha/deploy", Lease: time.Minute, At: t0},
		RenewLock{Namespace: "web", Holder: "alpha/deploy", Lease: time.Minute, At: t0},
		AcquireLock{Namespace: "db", Holder: "beta/migrate", Lease: time.Second, At: t0},
		ReleaseLock{Namespace: "nothing", Holder: "x", At: t0},
		ExpireLocks{At: t0.Add(time.Second)},
		RegisterMachine{Machine: machine("c3", "gamma"), At: t0},
		RemoveMachine{ID: "c3", At: t0},
		Probe{Machine: "a1", Seq: 1, At: t0},
		RenewLease{MachineID: "a1", Duration: StandbyLease, At: t0},
		AddSecretsKeyWraps{ID: "k1", Wraps: map[string][]byte{"a1": {1, 2, 3}}, At: t0},
		PutSecret{Namespace: "web", Name: "pw", KeyID: "k1", Nonce: []byte{1}, Sealed: []byte{2, 3}, Size: 1, Holder: "alpha/deploy", At: t0},
	}
}

func TestSnapshotRoundTripAndDeterminism(t *testing.T) {
	a, b := NewState(), NewState()
	for _, c := range history() {
		mustApply(t, a, c)
		mustApply(t, b, c)
	}
	snap := snapshotBytes(t, a)
	if !bytes.Equal(snap, snapshotBytes(t, b)) {
		t.Fatal("the same log gave different snapshots")
	}
	restored, err := ReadSnapshot(bytes.NewReader(snap))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(restored.Machines(), a.Machines()) || !reflect.DeepEqual(restored.Locks(), a.Locks()) {
		t.Fatalf("restored state differs:\n%+v\n%+v", restored.Machines(), a.Machines())
	}
	if !bytes.Equal(snap, snapshotBytes(t, restored)) {
		t.Fatal("snapshot of the restored state differs")
	}
	// A clone is independent of the original.
	c := a.Clone()
	mustApply(t, c, RemoveMachine{ID: "a1", At: t0})
	if _, ok := a.Machine("a1"); !ok {
		t.Fatal("changing a clone changed the original")
	}
}

func TestBadSnapshots(t *testing.T) {
	s := NewState()
	for _, c := range history() {
		mustApply(t, s, c)
	}
	good := snapshotBytes(t, s)
	badVersion := append([]byte{}, good...)
	badVersion[len(snapshotMagic)+1] = 99
	unknownKind := append(append([]byte{}, good[:len(snapshotMagic)+2]...), 77, 0, 0, 0, 2, '{', '}', 0)
	for name, b := range map[string][]byte{
		"empty":        nil,
		"bad magic":    append([]byte("NOTDROVR"), good[8:]...),
		"bad version":  badVersion,
		"truncated":    good[:len(good)-5],
		"no end":       good[:len(good)-1],
		"unknown kind": unknownKind,
	} {
		if _, err := ReadSnapshot(bytes.NewReader(b)); !errors.Is(err, ErrBadSnapshot) {
			t.Errorf("%s: got %v, want ErrBadSnapshot", name, err)
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	good, _ := Encode(ExpireLocks{At: t0})
	cases := map[string]struct {
		in   []byte
		want error
	}{
		"empty":          {nil, ErrUndecodable},
		"unknown type":   {append([]byte{200}, good[1:]...), ErrUnknownCommand},
		"type zero":      {append([]byte{0}, good[1:]...), ErrUnknownCommand},
		"garbage json":   {[]byte{byte(CmdAcquireLock), '{', 'x'}, ErrUndecodable},
		"unknown field":  {append([]byte{byte(CmdExpireLocks)}, []byte(`{"at":"2026-01-01T00:00:00Z","evil":1}`)...), ErrUndecodable},
		"trailing bytes": {append(append([]byte{}, good...), []byte(` {}`)...), ErrUndecodable},
		"wrong type":     {append([]byte{byte(CmdAcquireLock)}, []byte(`{"lease":"long"}`)...), ErrUndecodable},
	}
	for name, c := range cases {
		if _, err := Decode(c.in); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", name, err, c.want)
		}
		s := NewState()
		if _, err := s.Apply(c.in); !errors.Is(err, c.want) {
			t.Errorf("%s: Apply got %v, want %v", name, err, c.want)
		}
	}
}

func TestRuleErrorSurvivesJSON(t *testing.T) {
	s := NewState()
	mustApply(t, s, AcquireLock{Namespace: "web", Holder: "alice", Lease: time.Minute, At: t0})
	_, err := apply(t, s, AcquireLock{Namespace: "web", Holder: "bob", Lease: time.Minute, At: t0})
	b, _ := jsonRoundTrip(err.(*RuleError))
	if !errors.Is(b, ErrLockHeld) || b.Holder != "alice" || b.Error() != err.Error() {
		t.Fatalf("after JSON: %+v", b)
	}
}

func ReadSnapshotBytes(b []byte) (*State, error) { return ReadSnapshot(bytes.NewReader(b)) }

func TestProbeChangesNoFact(t *testing.T) {
	s := NewState()
	for _, c := range history()[:3] {
		mustApply(t, s, c)
	}
	before := snapshotBytes(t, s)
	if got := mustApply(t, s, Probe{Machine: "a1", Seq: 7, At: t0}); got != nil {
		t.Fatalf("probe result %v, want nil", got)
	}
	if !bytes.Equal(before, snapshotBytes(t, s)) {
		t.Fatal("a probe changed the facts")
	}
	expectRule(t, s, Probe{Seq: 1, At: t0}, ErrInvalid)
}
