package fsm

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

func TestSecretsRulesAndSnapshot(t *testing.T) {
	s := NewState()
	mustApply(t, s, RegisterMachine{Machine: machine("a", "a"), At: t0})
	mustApply(t, s, RegisterMachine{Machine: machine("b", "b"), At: t0})
	put := PutSecret{Namespace: "shop", Name: "db", KeyID: "k1", Nonce: []byte{1, 2, 3}, Sealed: []byte("sealed"), Size: 6, Holder: "me", At: t0}
	// No lock, no key: refused.
	expectRule(t, s, put, ErrLockNotHeld)
	mustApply(t, s, AcquireLock{Namespace: "shop", Holder: "me", Lease: time.Hour, At: t0})
	expectRule(t, s, put, ErrInvalid)
	expectRule(t, s, AddSecretsKeyWraps{ID: "k1", Wraps: map[string][]byte{"zz": {1}}, At: t0}, ErrUnknownMachine)
	mustApply(t, s, AddSecretsKeyWraps{ID: "k1", Wraps: map[string][]byte{"a": {1}}, At: t0})
	expectRule(t, s, AddSecretsKeyWraps{ID: "k2", Wraps: map[string][]byte{"b": {2}}, At: t0}, ErrConflict)
	mustApply(t, s, AddSecretsKeyWraps{ID: "k1", Wraps: map[string][]byte{"a": {9}, "b": {2}}, At: t0})
	if w := s.SecretsKey().Wraps; len(w) != 2 || w["a"][0] != 1 {
		t.Fatalf("wraps %v: a's first copy must stay", w)
	}
	if sec := mustApply(t, s, put).(Secret); sec.Version != 1 {
		t.Fatalf("version %d", sec.Version)
	}
	if sec := mustApply(t, s, put).(Secret); sec.Version != 2 {
		t.Fatalf("version %d", sec.Version)
	}
	big := put
	big.Size = MaxSecretBytes + 1
	expectRule(t, s, big, ErrInvalid)
	// A service using it keeps it from being removed.
	spec := ServiceSpec{Name: "web", Image: "img", Secrets: []SecretMount{{Name: "db", Path: "/run/secrets/db", Mode: 0o400}}}
	mustApply(t, s, PutService{Namespace: "shop", Spec: spec, MachineID: "a", ServicePrefix: netip.MustParsePrefix("10.200.0.0/24"), Holder: "me", At: t0})
	rm := RemoveSecret{Namespace: "shop", Name: "db", Holder: "me", At: t0}
	if rule := expectRule(t, s, rm, ErrInvalid); rule.Message != "secret shop/db is used by service web" {
		t.Fatalf("message %q", rule.Message)
	}
	// The snapshot keeps secrets and the key; the machine's removal drops its copy.
	raw := snapshotBytes(t, s)
	back, err := ReadSnapshot(bytes.NewReader(raw))
	if err != nil || !bytes.Equal(raw, snapshotBytes(t, back)) {
		t.Fatalf("round trip: %v", err)
	}
	if sec, ok := back.Secret("shop", "db"); !ok || sec.Version != 2 || back.SecretsKey().ID != "k1" {
		t.Fatalf("restored %+v %+v", sec, back.SecretsKey())
	}
	clone := s.Clone()
	mustApply(t, s, RemoveMachine{ID: "b", At: t0})
	if _, ok := s.SecretsKey().Wraps["b"]; ok {
		t.Fatal("a removed machine keeps its copy of the secrets key")
	}
	if _, ok := clone.SecretsKey().Wraps["b"]; !ok {
		t.Fatal("removing a machine changed a clone")
	}
	mustApply(t, s, RemoveService{Namespace: "shop", Name: "web", Holder: "me", At: t0})
	mustApply(t, s, rm)
	expectRule(t, s, rm, ErrUnknownSecret)
}
