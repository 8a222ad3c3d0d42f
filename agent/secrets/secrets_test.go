package secrets

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
	"golang.org/x/crypto/curve25519"
)

// machine is one member: its X25519 key and its keeper.
type machine struct {
	id   string
	priv [32]byte
	k    *Keeper
}

func newMachine(t *testing.T, facts *facttest.Store, members *facttest.Members, id string, seed byte) *machine {
	m := &machine{id: id}
	for i := range m.priv {
		m.priv[i] = seed + byte(i)
	}
	pub, err := curve25519.X25519(m.priv[:], curve25519.Basepoint)
	if err != nil {
		t.Fatal(err)
	}
	facts.Must(t, fsm.RegisterMachine{Machine: fsm.Machine{ID: id, Name: id, RPCAddr: "10.0.0.1:7948",
		WGPublicKey: base64.StdEncoding.EncodeToString(pub)}, At: facttest.T0})
	members.Set(id, id, "alive")
	m.k = New(Config{Self: id, Name: id, LockLease: time.Minute, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), PrivateKey: m.priv}, facts, members)
	return m
}

func TestSecretsAreSealedAndOpenOnlyForMembers(t *testing.T) {
	ctx := context.Background()
	facts, members := facttest.NewStore(), facttest.NewMembers()
	a := newMachine(t, facts, members, "a", 1)
	b := newMachine(t, facts, members, "b", 77)
	value := []byte("hunter2-very-secret\n")
	info, err := a.k.Set(ctx, ctlapi.SecretRequest{Secret: "shop/db-password", Value: value}, nil)
	if err != nil || info.Version != 1 || info.Size != len(value) {
		t.Fatalf("set: %+v %v", info, err)
	}
	// The facts hold no plaintext: not in the command log, not in a snapshot.
	var snap bytes.Buffer
	facts.Read(func(s *fsm.State) { s.WriteSnapshot(&snap) })
	if bytes.Contains(snap.Bytes(), value[:8]) {
		t.Fatal("the snapshot holds the secret in plaintext")
	}
	for _, c := range facts.Applied() {
		enc, _ := fsm.Encode(c)
		if bytes.Contains(enc, value[:8]) || strings.Contains(string(enc), base64.StdEncoding.EncodeToString(value)) {
			t.Fatalf("command %s holds the secret", c.Type())
		}
	}
	// Both members open it.
	for _, m := range []*machine{a, b} {
		got, err := m.k.Open("shop", "db-password")
		if err != nil || !bytes.Equal(got, value) {
			t.Fatalf("%s opens %q, %v", m.id, got, err)
		}
	}
	// A machine registered after the key was made has no copy until the
	// leader wraps one for it.
	c := newMachine(t, facts, members, "c", 200)
	if _, err := c.k.Open("shop", "db-password"); !errors.Is(err, ErrNoKey) {
		t.Fatalf("c before its wrap: %v", err)
	}
	members.SetLeader(true)
	if err := a.k.wrapMissing(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := c.k.Open("shop", "db-password"); err != nil || !bytes.Equal(got, value) {
		t.Fatalf("c after its wrap: %q %v", got, err)
	}
	// A key that is not a member's opens nothing: a stranger claiming c's id.
	stranger := New(Config{Self: "c", Name: "c", Logger: c.k.cfg.Logger, PrivateKey: [32]byte{9, 9, 9}}, facts, members)
	if _, err := stranger.Open("shop", "db-password"); !errors.Is(err, ErrNoKey) {
		t.Fatalf("a stranger's key: %v", err)
	}
	// A sealed value copied under another name does not open.
	var sec fsm.Secret
	facts.Read(func(s *fsm.State) { sec, _ = s.Secret("shop", "db-password"); _ = s })
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "t", Lease: time.Hour, At: time.Now()})
	facts.Must(t, fsm.PutSecret{Namespace: "shop", Name: "copied", KeyID: sec.KeyID, Nonce: sec.Nonce, Sealed: sec.Sealed, Size: sec.Size, Holder: "t", At: time.Now()})
	facts.Must(t, fsm.ReleaseLock{Namespace: "shop", Holder: "t", At: time.Now()})
	if _, err := a.k.Open("shop", "copied"); err == nil {
		t.Fatal("a value copied under another name opened")
	}
	// Set again: version 2, the same key.
	if info, err := b.k.Set(ctx, ctlapi.SecretRequest{Secret: "shop/db-password", Value: []byte("new")}, nil); err != nil || info.Version != 2 {
		t.Fatalf("second set: %+v %v", info, err)
	}
	if got, _ := c.k.Open("shop", "db-password"); string(got) != "new" {
		t.Fatalf("after the second set: %q", got)
	}
}

func TestBadSecretsAreRefusedAndChangeNothing(t *testing.T) {
	ctx := context.Background()
	facts, members := facttest.NewStore(), facttest.NewMembers()
	a := newMachine(t, facts, members, "a", 1)
	before := len(facts.Applied())
	for _, c := range []struct {
		req  ctlapi.SecretRequest
		want string
	}{
		{ctlapi.SecretRequest{Secret: "shop/Bad_Name", Value: []byte("x")}, `secret name "Bad_Name" is not a DNS label`},
		{ctlapi.SecretRequest{Secret: "noslash", Value: []byte("x")}, "noslash"},
		{ctlapi.SecretRequest{Secret: "shop/big", Value: make([]byte, fsm.MaxSecretBytes+1)}, "the limit is 65536"},
	} {
		if _, err := a.k.Set(ctx, c.req, nil); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.req.Secret, err, c.want)
		}
	}
	if n := len(facts.Applied()); n != before {
		t.Fatalf("refused secrets changed the facts: %d commands", n-before)
	}
	// A service naming a secret the namespace lacks is refused by the facts.
	facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "t", Lease: time.Hour, At: time.Now()})
	_, err := facts.Apply(ctx, fsm.PutService{Namespace: "shop", MachineID: "a", Holder: "t", At: time.Now(),
		Spec: fsm.ServiceSpec{Name: "web", Image: "img", Secrets: []fsm.SecretMount{{Name: "missing", Path: "/run/secrets/missing", Mode: 0o400}}}})
	if !errors.Is(err, fsm.ErrUnknownSecret) || !strings.Contains(err.Error(), "droverctl secret set shop/missing") {
		t.Fatalf("a service naming a missing secret: %v", err)
	}
}
