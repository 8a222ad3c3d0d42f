package fsm

import (
	"fmt"
	"path"
	"strings"
	"time"
)

// SecretMount is a secret a service reads, as a file in its container.
type SecretMount struct {
	Name string `json:"name"` // the secret, in the service's namespace
	// Path in the container (default /run/secrets/NAME); the file is
	// owned by UID:GID with mode Mode (default 0400), on a tmpfs.
	Path string `json:"path"`
	UID  int    `json:"uid,omitempty"`
	GID  int    `json:"gid,omitempty"`
	Mode uint32 `json:"mode,omitempty"`
}

// Secret is a namespace's secret value, sealed: the fact store holds
// only ciphertext under the cluster's secrets key (SecretsKey), which
// only members hold.
type Secret struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	KeyID     string    `json:"key_id"`
	Nonce     []byte    `json:"nonce"`
	Sealed    []byte    `json:"sealed"`
	Version   uint64    `json:"version"` // bumped on every change
	Size      int       `json:"size"`    // of the plaintext
	UpdatedAt time.Time `json:"updated_at"`
}

// Key is namespace/name.
func (s Secret) Key() string { return s.Namespace + "/" + s.Name }

// SecretsKey is the cluster's key for secrets, never in the clear: Wraps
// holds it sealed to each machine's WireGuard public key, so a member
// opens its own copy with its private key and nobody else can.
type SecretsKey struct {
	ID    string            `json:"id"`
	Wraps map[string][]byte `json:"wraps"` // by machine id
}

// Bounds of secrets.
const (
	MaxSecretBytes   = 64 << 10
	maxSecretsPerSvc = 64
)

// AddSecretsKeyWraps makes the secrets key (the first time) or adds
// wraps of it for more machines. A different ID than the store's is
// refused: the key is made once. Result: SecretsKey.
type AddSecretsKeyWraps struct {
	ID    string            `json:"id"`
	Wraps map[string][]byte `json:"wraps"`
	At    time.Time         `json:"at"`
}

// Type implements Command.
func (AddSecretsKeyWraps) Type() CommandType { return CmdAddSecretsKeyWraps }

func (s *State) addSecretsKeyWraps(c AddSecretsKeyWraps) (any, *RuleError) {
	if c.ID == "" || len(c.Wraps) == 0 {
		return nil, ruleErr(ErrInvalid, "a secrets key needs an id and at least one wrap")
	}
	if s.secretsKey.ID != "" && s.secretsKey.ID != c.ID {
		return nil, ruleErr(ErrConflict, "the cluster already has secrets key %s", s.secretsKey.ID)
	}
	next := SecretsKey{ID: c.ID, Wraps: map[string][]byte{}}
	for id, w := range s.secretsKey.Wraps {
		next.Wraps[id] = w
	}
	for id, w := range c.Wraps {
		if _, ok := s.machines[id]; !ok {
			return nil, ruleErr(ErrUnknownMachine, "no machine with id %q to wrap the secrets key for", id)
		}
		if len(w) == 0 || len(w) > 256 {
			return nil, ruleErr(ErrInvalid, "wrap for machine %s: %d bytes", id, len(w))
		}
		if _, has := next.Wraps[id]; !has {
			next.Wraps[id] = w
		}
	}
	s.secretsKey = next
	return next, nil
}

// PutSecret sets a secret's sealed value, under the namespace lock.
// Result: Secret.
type PutSecret struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	KeyID     string    `json:"key_id"`
	Nonce     []byte    `json:"nonce"`
	Sealed    []byte    `json:"sealed"`
	Size      int       `json:"size"`
	Holder    string    `json:"holder"`
	At        time.Time `json:"at"`
}

// Type implements Command.
func (PutSecret) Type() CommandType { return CmdPutSecret }

func (s *State) putSecret(c PutSecret) (any, *RuleError) {
	if err := s.requireLock(c.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	if !ValidName(c.Name) {
		return nil, ruleErr(ErrInvalid, "secret name %q is not a DNS label", c.Name)
	}
	if c.KeyID == "" || c.KeyID != s.secretsKey.ID {
		return nil, ruleErr(ErrInvalid, "secret %s/%s is sealed under key %q, the cluster's is %q", c.Namespace, c.Name, c.KeyID, s.secretsKey.ID)
	}
	if c.Size < 0 || c.Size > MaxSecretBytes || len(c.Sealed) > MaxSecretBytes+64 || len(c.Nonce) == 0 || len(c.Nonce) > 32 {
		return nil, ruleErr(ErrInvalid, "secret %s/%s: %d bytes, the limit is %d", c.Namespace, c.Name, c.Size, MaxSecretBytes)
	}
	key := c.Namespace + "/" + c.Name
	old := s.secrets[key]
	sec := Secret{Namespace: c.Namespace, Name: c.Name, KeyID: c.KeyID, Nonce: c.Nonce, Sealed: c.Sealed,
		Version: old.Version + 1, Size: c.Size, UpdatedAt: c.At}
	s.secrets[key] = sec
	return sec, nil
}

// RemoveSecret forgets a secret no service uses, under the namespace
// lock.
type RemoveSecret struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Holder    string    `json:"holder"`
	At        time.Time `json:"at"`
}

// Type implements Command.
func (RemoveSecret) Type() CommandType { return CmdRemoveSecret }

func (s *State) removeSecret(c RemoveSecret) (any, *RuleError) {
	if err := s.requireLock(c.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	key := c.Namespace + "/" + c.Name
	if _, ok := s.secrets[key]; !ok {
		return nil, ruleErr(ErrUnknownSecret, "no secret %s", key)
	}
	if users := s.SecretUsers(c.Namespace, c.Name); len(users) > 0 {
		return nil, ruleErr(ErrInvalid, "secret %s is used by service %s", key, strings.Join(users, ", "))
	}
	delete(s.secrets, key)
	return nil, nil
}

// SecretUsers lists the services of namespace that name the secret.
func (s *State) SecretUsers(namespace, name string) []string {
	var users []string
	for _, sv := range s.Services() {
		if sv.Namespace != namespace {
			continue
		}
		for _, sm := range sv.Spec.Secrets {
			if sm.Name == name {
				users = append(users, sv.Spec.Name)
			}
		}
	}
	return users
}

// Secret returns a namespace's secret.
func (s *State) Secret(namespace, name string) (Secret, bool) {
	sec, ok := s.secrets[namespace+"/"+name]
	return sec, ok
}

// Secrets lists the secrets, sorted by namespace/name.
func (s *State) Secrets() []Secret { return sortedValues(s.secrets, Secret.Key) }

// SecretsKey returns the cluster's secrets key (its ID empty: none yet).
func (s *State) SecretsKey() SecretsKey { return s.secretsKey }

// validateSecretMounts checks a spec's secrets: names, paths, modes.
func validateSecretMounts(sp ServiceSpec) error {
	if len(sp.Secrets) > maxSecretsPerSvc {
		return fmt.Errorf("service %s: %d secrets, at most %d", sp.Name, len(sp.Secrets), maxSecretsPerSvc)
	}
	seen := map[string]bool{}
	for _, sm := range sp.Secrets {
		if !ValidName(sm.Name) {
			return fmt.Errorf("service %s: secret name %q is not a DNS label", sp.Name, sm.Name)
		}
		if !strings.HasPrefix(sm.Path, "/") || path.Clean(sm.Path) != sm.Path || sm.Path == "/" {
			return fmt.Errorf("service %s: secret %s: path %q must be absolute and clean", sp.Name, sm.Name, sm.Path)
		}
		if seen[sm.Path] {
			return fmt.Errorf("service %s: two secrets at %s", sp.Name, sm.Path)
		}
		seen[sm.Path] = true
		if sm.UID < 0 || sm.GID < 0 || sm.Mode&^0o777 != 0 {
			return fmt.Errorf("service %s: secret %s: bad owner %d:%d or mode %o", sp.Name, sm.Name, sm.UID, sm.GID, sm.Mode)
		}
	}
	return nil
}
