// Package secrets keeps a namespace's secrets sealed in the fact store and
// opens them on the machine that runs a service using them. See
// DESIGN.md.
package secrets

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/internal/nslock"
	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
	FactsChanged() <-chan struct{}
}

// Members tells the facts level others gossip and whether this machine
// leads.
type Members interface {
	factview.Gossip
	IsLeader() bool
}

// Restarter restarts a service so that it reads its secrets' new values.
type Restarter interface {
	Restart(ctx context.Context, service string) (ctlapi.RestartResult, error)
}

// Config is this machine as the secrets need it.
type Config struct {
	Self      string
	Name      string
	LockLease time.Duration
	Logger    *slog.Logger
	// PrivateKey is this machine's WireGuard private key (X25519): the
	// secrets key is sealed to its public half.
	PrivateKey [32]byte
}

// Keeper seals and opens secrets, and hands the secrets key to machines
// that join after it was made.
type Keeper struct {
	cfg    Config
	facts  Facts
	gossip Members
	public [32]byte

	mu  sync.Mutex
	key map[string][]byte // opened secrets keys, by id
}

// New makes this machine's keeper.
func New(cfg Config, facts Facts, gossip Members) *Keeper {
	k := &Keeper{cfg: cfg, facts: facts, gossip: gossip, key: map[string][]byte{}}
	pub, _ := curve25519.X25519(cfg.PrivateKey[:], curve25519.Basepoint)
	copy(k.public[:], pub)
	return k
}

// Errors a caller matches.
var (
	ErrNoKey   = errors.New("this machine holds no copy of the secrets key")
	ErrTooBig  = errors.New("secret too large")
	ErrUnknown = errors.New("no such secret")
)

// aad binds a sealed value to its secret's name and key: a value copied
// under another name does not open.
func aad(namespace, name, keyID string) []byte {
	return []byte("drover secret v1\x00" + namespace + "/" + name + "\x00" + keyID)
}

// Open returns a secret's plaintext.
func (k *Keeper) Open(namespace, name string) ([]byte, error) {
	var sec fsm.Secret
	var ok bool
	var sk fsm.SecretsKey
	k.facts.Read(func(s *fsm.State) {
		sec, ok = s.Secret(namespace, name)
		sk = s.SecretsKey()
	})
	if !ok {
		return nil, fmt.Errorf("%w: %s/%s", ErrUnknown, namespace, name)
	}
	key, err := k.openKey(sk)
	if err != nil {
		return nil, err
	}
	if sec.KeyID != sk.ID {
		return nil, fmt.Errorf("secret %s/%s is sealed under key %s, not the cluster's %s", namespace, name, sec.KeyID, sk.ID)
	}
	aead, err := chacha20poly1305.NewX(key)
	if err != nil {
		return nil, err
	}
	plain, err := aead.Open(nil, sec.Nonce, sec.Sealed, aad(namespace, name, sec.KeyID))
	if err != nil {
		return nil, fmt.Errorf("opening secret %s/%s: %w", namespace, name, err)
	}
	return plain, nil
}

// openKey opens this machine's wrap of the secrets key.
func (k *Keeper) openKey(sk fsm.SecretsKey) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if key, ok := k.key[sk.ID]; ok {
		return key, nil
	}
	wrap, ok := sk.Wraps[k.cfg.Self]
	if sk.ID == "" || !ok {
		return nil, fmt.Errorf("%w (machine %s; the leader wraps it for machines that join)", ErrNoKey, k.cfg.Name)
	}
	priv := k.cfg.PrivateKey
	key, ok := box.OpenAnonymous(nil, wrap, &k.public, &priv)
	if !ok || len(key) != chacha20poly1305.KeySize {
		return nil, fmt.Errorf("%w: the copy wrapped for machine %s does not open with its WireGuard key", ErrNoKey, k.cfg.Name)
	}
	k.key[sk.ID] = key
	return key, nil
}

// wrapFor seals key to each machine's WireGuard public key.
func wrapFor(key []byte, machines []fsm.Machine) (map[string][]byte, error) {
	wraps := map[string][]byte{}
	for _, m := range machines {
		pub, err := publicKey(m.WGPublicKey)
		if err != nil {
			continue // not yet told: wrapped once it is
		}
		sealed, err := box.SealAnonymous(nil, key, &pub, rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("sealing the secrets key for %s: %w", m.Name, err)
		}
		wraps[m.ID] = sealed
	}
	return wraps, nil
}

// Set seals value as namespace/name under the namespace's lock, making
// the cluster's secrets key first if there is none. With restart, the
// services using it are restarted after, one at a time.
func (k *Keeper) Set(ctx context.Context, req ctlapi.SecretRequest, restarter Restarter) (ctlapi.SecretInfo, error) {
	ns, name, err := factview.SplitService(req.Secret)
	if err != nil {
		return ctlapi.SecretInfo{}, err
	}
	if !fsm.ValidName(name) {
		return ctlapi.SecretInfo{}, badRequest(fmt.Errorf("secret name %q is not a DNS label", name))
	}
	if len(req.Value) > fsm.MaxSecretBytes {
		return ctlapi.SecretInfo{}, badRequest(fmt.Errorf("%w: secret %s is %d bytes, the limit is %d", ErrTooBig, req.Secret, len(req.Value), fsm.MaxSecretBytes))
	}
	if ok, old := factview.FactsAt(k.facts, k.gossip, cluster.FactsLevelOperator); !ok {
		return ctlapi.SecretInfo{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeBadRequest,
			Err: fmt.Errorf("secrets need every machine upgraded: %s runs an older droverd (or is not seen)", old)}
	}
	key, keyID, err := k.ensureKey(ctx)
	if err != nil {
		return ctlapi.SecretInfo{}, err
	}
	aead, err := chacha20poly1305.NewX(key)
	if err != nil {
		return ctlapi.SecretInfo{}, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return ctlapi.SecretInfo{}, err
	}
	sealed := aead.Seal(nil, nonce, req.Value, aad(ns, name, keyID))
	holder := k.cfg.Name + "/secret/" + name
	lock, err := nslock.Acquire(ctx, k.facts, ns, holder, k.cfg.LockLease, k.cfg.Logger)
	if err != nil {
		return ctlapi.SecretInfo{}, err
	}
	res, err := k.facts.Apply(ctx, fsm.PutSecret{Namespace: ns, Name: name, KeyID: keyID, Nonce: nonce, Sealed: sealed,
		Size: len(req.Value), Holder: holder, At: time.Now()})
	lock.Release()
	if err != nil {
		return ctlapi.SecretInfo{}, fmt.Errorf("recording secret %s: %w", req.Secret, err)
	}
	var sec fsm.Secret
	if err := json.Unmarshal(res, &sec); err != nil {
		return ctlapi.SecretInfo{}, fmt.Errorf("reading the recorded secret: %w", err)
	}
	k.cfg.Logger.Info("secret set", "secret", req.Secret, "version", sec.Version, "bytes", sec.Size)
	info := k.info(sec)
	if req.Restart && restarter != nil {
		for _, user := range info.UsedBy {
			if _, err := restarter.Restart(ctx, ns+"/"+user); err != nil {
				return info, fmt.Errorf("secret %s set; restarting %s/%s: %w", req.Secret, ns, user, err)
			}
			info.Restarted = append(info.Restarted, user)
		}
	}
	return info, nil
}

// ensureKey returns the cluster's secrets key, making it when there is
// none: a fresh random key wrapped for every registered machine.
func (k *Keeper) ensureKey(ctx context.Context) ([]byte, string, error) {
	var sk fsm.SecretsKey
	var machines []fsm.Machine
	k.facts.Read(func(s *fsm.State) { sk, machines = s.SecretsKey(), s.Machines() })
	if sk.ID != "" {
		key, err := k.openKey(sk)
		return key, sk.ID, err
	}
	key := make([]byte, chacha20poly1305.KeySize)
	idb := make([]byte, 8)
	if _, err := rand.Read(key); err != nil {
		return nil, "", err
	}
	if _, err := rand.Read(idb); err != nil {
		return nil, "", err
	}
	wraps, err := wrapFor(key, live(machines))
	if err != nil {
		return nil, "", err
	}
	id := hex.EncodeToString(idb)
	if _, err := k.facts.Apply(ctx, fsm.AddSecretsKeyWraps{ID: id, Wraps: wraps, At: time.Now()}); err != nil {
		if errors.Is(err, fsm.ErrConflict) {
			// Another machine made it first: use that one.
			k.facts.Read(func(s *fsm.State) { sk = s.SecretsKey() })
			key, err := k.openKey(sk)
			return key, sk.ID, err
		}
		return nil, "", fmt.Errorf("recording the secrets key: %w", err)
	}
	k.cfg.Logger.Info("made the cluster's secrets key", "id", id, "machines", len(wraps))
	return key, id, nil
}

// live lists the machines that may hold the key: registered and not gone.
func live(machines []fsm.Machine) []fsm.Machine {
	var out []fsm.Machine
	for _, m := range machines {
		if m.State != fsm.MachineGone {
			out = append(out, m)
		}
	}
	return out
}

// Remove forgets a secret no service uses.
func (k *Keeper) Remove(ctx context.Context, secret string) error {
	ns, name, err := factview.SplitService(secret)
	if err != nil {
		return err
	}
	holder := k.cfg.Name + "/secret/" + name
	lock, err := nslock.Acquire(ctx, k.facts, ns, holder, k.cfg.LockLease, k.cfg.Logger)
	if err != nil {
		return err
	}
	defer lock.Release()
	if _, err := k.facts.Apply(ctx, fsm.RemoveSecret{Namespace: ns, Name: name, Holder: holder, At: time.Now()}); err != nil {
		if errors.Is(err, fsm.ErrUnknownSecret) {
			return &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeBadRequest, Err: err}
		}
		return fmt.Errorf("removing secret %s: %w", secret, err)
	}
	k.cfg.Logger.Info("secret removed", "secret", secret)
	return nil
}

// List lists the secrets: names, versions, sizes, users; never values.
func (k *Keeper) List() []ctlapi.SecretInfo {
	var out []ctlapi.SecretInfo
	k.facts.Read(func(s *fsm.State) {
		for _, sec := range s.Secrets() {
			info := ctlapi.SecretInfo{Secret: sec.Key(), Version: sec.Version, Size: sec.Size, UpdatedAt: sec.UpdatedAt,
				UsedBy: s.SecretUsers(sec.Namespace, sec.Name)}
			out = append(out, info)
		}
	})
	return out
}

func (k *Keeper) info(sec fsm.Secret) ctlapi.SecretInfo {
	info := ctlapi.SecretInfo{Secret: sec.Key(), Version: sec.Version, Size: sec.Size, UpdatedAt: sec.UpdatedAt}
	k.facts.Read(func(s *fsm.State) { info.UsedBy = s.SecretUsers(sec.Namespace, sec.Name) })
	return info
}

// Run, on the leader, wraps the secrets key for registered machines that
// lack a copy, whenever the facts change, until ctx ends.
func (k *Keeper) Run(ctx context.Context) {
	retry := time.NewTicker(10 * time.Second)
	defer retry.Stop()
	for {
		if k.gossip.IsLeader() {
			if err := k.wrapMissing(ctx); err != nil && ctx.Err() == nil {
				k.cfg.Logger.Warn("wrapping the secrets key for new machines", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-k.facts.FactsChanged():
		case <-retry.C:
		}
	}
}

// wrapMissing wraps the key for machines without a copy.
func (k *Keeper) wrapMissing(ctx context.Context) error {
	var sk fsm.SecretsKey
	var missing []fsm.Machine
	k.facts.Read(func(s *fsm.State) {
		sk = s.SecretsKey()
		for _, m := range live(s.Machines()) {
			if _, ok := sk.Wraps[m.ID]; !ok && m.WGPublicKey != "" {
				missing = append(missing, m)
			}
		}
	})
	if sk.ID == "" || len(missing) == 0 {
		return nil
	}
	key, err := k.openKey(sk)
	if err != nil {
		return err
	}
	wraps, err := wrapFor(key, missing)
	if err != nil || len(wraps) == 0 {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := k.facts.Apply(actx, fsm.AddSecretsKeyWraps{ID: sk.ID, Wraps: wraps, At: time.Now()}); err != nil {
		return err
	}
	k.cfg.Logger.Info("wrapped the secrets key for new machines", "machines", len(wraps))
	return nil
}

func badRequest(err error) error {
	return &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadRequest, Err: err}
}

// publicKey reads a WireGuard public key (base64).
func publicKey(text string) ([32]byte, error) {
	var k [32]byte
	b, err := base64.StdEncoding.DecodeString(text)
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("not a WireGuard public key: %q", text)
	}
	copy(k[:], b)
	return k, nil
}
