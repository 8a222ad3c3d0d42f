package fsm

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"
)

func grant(id string, ttl time.Duration, singleUse bool) IssueJoinGrant {
	return IssueJoinGrant{Grant: JoinGrant{ID: id, Secret: bytes.Repeat([]byte{7}, 32), IssuedBy: "a", ExpiresAt: t0.Add(ttl), SingleUse: singleUse}, At: t0}
}

func admit(m Machine, grant string, at time.Time) RegisterMachine {
	return RegisterMachine{Machine: m, Grant: grant, At: at}
}

func TestJoinGrantAdmitsNewMachinesUntilItExpires(t *testing.T) {
	s := NewState()
	mustApply(t, s, RegisterMachine{Machine: machine("a", "a"), At: t0}) // the first machine: no grant
	mustApply(t, s, grant("g1", time.Hour, false))

	mustApply(t, s, admit(machine("b", "b"), "g1", t0.Add(time.Minute)))
	mustApply(t, s, admit(machine("c", "c"), "g1", t0.Add(2*time.Minute)))
	if g, _ := s.JoinGrant("g1"); !reflect.DeepEqual(g.UsedBy, []string{"b", "c"}) {
		t.Fatalf("used by %v", g.UsedBy)
	}
	rule := expectRule(t, s, admit(machine("d", "d"), "g1", t0.Add(time.Hour)), ErrGrantRefused)
	if !strings.Contains(rule.Message, "expired at") {
		t.Fatalf("message %q does not say it expired", rule.Message)
	}
	expectRule(t, s, admit(machine("d", "d"), "nope", t0), ErrGrantRefused)
	// A registered machine updating itself needs no grant, even an expired one.
	m := machine("b", "b")
	m.WGEndpoint = "10.0.0.2:51820"
	mustApply(t, s, admit(m, "g1", t0.Add(2*time.Hour)))
}

func TestSingleUseGrantAdmitsOneMachine(t *testing.T) {
	s := NewState()
	mustApply(t, s, grant("once", time.Hour, true))
	mustApply(t, s, admit(machine("b", "b"), "once", t0))
	rule := expectRule(t, s, admit(machine("c", "c"), "once", t0), ErrGrantRefused)
	if !strings.Contains(rule.Message, "single-use") || !strings.Contains(rule.Message, "machine b") {
		t.Fatalf("message %q does not name the rule and the machine that used it", rule.Message)
	}
}

func TestIssueJoinGrantRules(t *testing.T) {
	s := NewState()
	g := grant("g", time.Hour, false)
	g.Grant.Secret = []byte("short")
	expectRule(t, s, g, ErrInvalid)
	expectRule(t, s, grant("g", -time.Second, false), ErrInvalid)
	expectRule(t, s, grant("g", MaxGrantLifetime+time.Hour, false), ErrInvalid)
	expectRule(t, s, grant("Bad ID", time.Hour, false), ErrInvalid)
	mustApply(t, s, grant("g", time.Hour, false))
	expectRule(t, s, grant("g", time.Hour, false), ErrInvalid)

	// Issuing a grant forgets those that expired.
	later := grant("h", time.Hour, false)
	later.At, later.Grant.ExpiresAt = t0.Add(2*time.Hour), t0.Add(3*time.Hour)
	mustApply(t, s, later)
	if _, ok := s.JoinGrant("g"); ok {
		t.Fatal("expired grant g kept")
	}
}

func TestRemovedMachineIsRevoked(t *testing.T) {
	s := NewState()
	m := machine("b", "b")
	m.WGPublicKey = "key-of-b"
	mustApply(t, s, grant("g", time.Hour, false))
	mustApply(t, s, admit(m, "g", t0))
	mustApply(t, s, RemoveMachine{ID: "b", At: t0.Add(time.Minute)})
	if r, ok := s.RevokedFor("b", ""); !ok || r.Name != "b" || r.WGPublicKey != "key-of-b" {
		t.Fatalf("revocation %+v %v", r, ok)
	}
	// Neither its id (with a new key) nor its key (under a new id) comes back.
	m.WGPublicKey = "new-key"
	expectRule(t, s, admit(m, "g", t0.Add(2*time.Minute)), ErrMachineRevoked)
	other := machine("z", "z")
	other.WGPublicKey = "key-of-b"
	expectRule(t, s, admit(other, "g", t0.Add(2*time.Minute)), ErrMachineRevoked)

	// Entries from before grants (no Grant) apply as they did.
	mustApply(t, s, RegisterMachine{Machine: m, At: t0.Add(3 * time.Minute)})
}

func TestKeyringRules(t *testing.T) {
	s := NewState()
	k1, k2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	expectRule(t, s, SetKeyring{Keys: nil, At: t0}, ErrInvalid)
	expectRule(t, s, SetKeyring{Keys: [][]byte{k1[:16]}, At: t0}, ErrInvalid)
	expectRule(t, s, SetKeyring{Keys: [][]byte{k1, k1}, At: t0}, ErrInvalid)
	expectRule(t, s, SetKeyring{Keys: [][]byte{k1, k2, k1[:0], k2, k1}, At: t0}, ErrInvalid)
	mustApply(t, s, SetKeyring{Keys: [][]byte{k1, k2}, At: t0})
	mustApply(t, s, SetKeyring{Keys: [][]byte{k2}, At: t0})
	if kr := s.Keyring(); kr.Generation != 2 || len(kr.Keys) != 1 || !bytes.Equal(kr.Keys[0], k2) {
		t.Fatalf("keyring %+v", kr)
	}
}

func TestTrustFactsSurviveASnapshot(t *testing.T) {
	s := NewState()
	m := machine("b", "b")
	m.WGPublicKey = "key-of-b"
	mustApply(t, s, grant("g", time.Hour, true))
	mustApply(t, s, admit(m, "g", t0))
	mustApply(t, s, RemoveMachine{ID: "b", At: t0})
	mustApply(t, s, SetKeyring{Keys: [][]byte{bytes.Repeat([]byte{3}, 32)}, At: t0})
	raw := snapshotBytes(t, s)
	back, err := ReadSnapshot(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, snapshotBytes(t, back)) {
		t.Fatal("restored state writes another snapshot")
	}
	if _, ok := back.RevokedFor("", "key-of-b"); !ok || back.Keyring().Generation != 1 || len(back.JoinGrants()) != 1 {
		t.Fatalf("restored: revoked %v, keyring %+v, grants %+v", back.RevokedMachines(), back.Keyring(), back.JoinGrants())
	}
	if c := back.Clone(); !bytes.Equal(raw, snapshotBytes(t, c)) {
		t.Fatal("clone differs")
	}
}
