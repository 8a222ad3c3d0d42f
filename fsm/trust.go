package fsm

import (
	"bytes"
	"time"
)

// A JoinGrant admits new machines: `cluster join-token` issues one, and
// the leader registers a machine it has never seen only when the
// machine proves it holds the grant's secret. The secret stays in the
// facts, which only members hold; tokens carry it to the newcomer.
type JoinGrant struct {
	ID        string    `json:"id"`
	Secret    []byte    `json:"secret"`
	IssuedAt  time.Time `json:"issued_at"`
	IssuedBy  string    `json:"issued_by"` // machine id
	ExpiresAt time.Time `json:"expires_at"`
	SingleUse bool      `json:"single_use,omitempty"`
	UsedBy    []string  `json:"used_by,omitempty"` // machine ids it admitted
}

// Revoked records a machine that was removed: neither its id nor its
// WireGuard key is admitted again.
type Revoked struct {
	MachineID   string    `json:"machine_id"`
	Name        string    `json:"name"`
	WGPublicKey string    `json:"wg_public_key"`
	At          time.Time `json:"at"`
}

// Keyring is the gossip keys every member installs: Keys[0] encrypts,
// every key decrypts. It is empty until the first rotation (until then
// each machine uses the key it joined with). Generation counts changes.
type Keyring struct {
	Keys       [][]byte  `json:"keys"`
	Generation uint64    `json:"generation"`
	UpdatedAt  time.Time `json:"updated_at"`
}

// Limits of the trust facts.
const (
	GossipKeySize  = 32
	maxGossipKeys  = 4
	minGrantSecret = 16
	// MaxGrantLifetime bounds how long a join token may be valid.
	MaxGrantLifetime = 30 * 24 * time.Hour
)

// Rule errors of the trust facts.
var (
	ErrGrantRefused   = &RuleError{Code: "join_refused"}
	ErrMachineRevoked = &RuleError{Code: "machine_revoked"}
)

// IssueJoinGrant records a grant; grants expired by At are forgotten.
// Result: JoinGrant.
type IssueJoinGrant struct {
	Grant JoinGrant `json:"grant"`
	At    time.Time `json:"at"`
}

// SetKeyring replaces the gossip keyring (Keys[0] is the primary).
// Result: Keyring.
type SetKeyring struct {
	Keys [][]byte  `json:"keys"`
	At   time.Time `json:"at"`
}

// Type implements Command.
func (IssueJoinGrant) Type() CommandType { return CmdIssueJoinGrant }

// Type implements Command.
func (SetKeyring) Type() CommandType { return CmdSetKeyring }

func (s *State) issueJoinGrant(c IssueJoinGrant) (any, *RuleError) {
	g := c.Grant
	switch {
	case !validID(g.ID):
		return nil, ruleErr(ErrInvalid, "join grant id %q: want 1-64 of a-z, 0-9 and -", g.ID)
	case len(g.Secret) < minGrantSecret:
		return nil, ruleErr(ErrInvalid, "join grant %s: secret of %d bytes, want at least %d", g.ID, len(g.Secret), minGrantSecret)
	case !g.ExpiresAt.After(c.At):
		return nil, ruleErr(ErrInvalid, "join grant %s expires at %s, before it is issued", g.ID, g.ExpiresAt.Format(time.RFC3339))
	case g.ExpiresAt.Sub(c.At) > MaxGrantLifetime:
		return nil, ruleErr(ErrInvalid, "join grant %s: valid for %s, the limit is %s", g.ID, g.ExpiresAt.Sub(c.At).Round(time.Second), MaxGrantLifetime)
	}
	if _, dup := s.grants[g.ID]; dup {
		return nil, ruleErr(ErrInvalid, "join grant %s exists", g.ID)
	}
	for id, old := range s.grants {
		if !old.ExpiresAt.After(c.At) {
			delete(s.grants, id)
		}
	}
	g.IssuedAt, g.UsedBy = c.At, nil
	s.grants[g.ID] = g
	return g, nil
}

// GrantUsable tells why grant id cannot admit machine at time at, or nil.
func (s *State) GrantUsable(id, machineID string, at time.Time) *RuleError {
	g, ok := s.grants[id]
	if !ok {
		return ruleErr(ErrGrantRefused, "join token %s is unknown to the cluster (expired and forgotten, or never issued)", id)
	}
	if !g.ExpiresAt.After(at) {
		return ruleErr(ErrGrantRefused, "join token %s expired at %s", id, g.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if g.SingleUse && len(g.UsedBy) > 0 && g.UsedBy[0] != machineID {
		name := g.UsedBy[0]
		if m, ok := s.machines[name]; ok {
			name = m.Name
		}
		return ruleErr(ErrGrantRefused, "join token %s was single-use and machine %s used it", id, name)
	}
	return nil
}

// RevokedFor tells whether a machine id or WireGuard key was removed.
func (s *State) RevokedFor(machineID, wgKey string) (Revoked, bool) {
	if r, ok := s.revoked[machineID]; ok {
		return r, true
	}
	if wgKey == "" {
		return Revoked{}, false
	}
	for _, r := range s.revoked {
		if r.WGPublicKey == wgKey {
			return r, true
		}
	}
	return Revoked{}, false
}

// admitWithGrant checks and records a new machine's use of a grant.
func (s *State) admitWithGrant(m Machine, grant string, at time.Time) *RuleError {
	if r, ok := s.RevokedFor(m.ID, m.WGPublicKey); ok {
		return ruleErr(ErrMachineRevoked, "machine %s (%s) was removed at %s: it joins again only with a new data dir", r.Name, r.MachineID, r.At.UTC().Format(time.RFC3339))
	}
	if err := s.GrantUsable(grant, m.ID, at); err != nil {
		return err
	}
	g := s.grants[grant]
	g.UsedBy = append(append([]string(nil), g.UsedBy...), m.ID)
	s.grants[grant] = g
	return nil
}

func (s *State) setKeyring(c SetKeyring) (any, *RuleError) {
	if len(c.Keys) == 0 || len(c.Keys) > maxGossipKeys {
		return nil, ruleErr(ErrInvalid, "gossip keyring of %d keys: want 1 to %d", len(c.Keys), maxGossipKeys)
	}
	for i, k := range c.Keys {
		if len(k) != GossipKeySize {
			return nil, ruleErr(ErrInvalid, "gossip key %d is %d bytes, want %d", i, len(k), GossipKeySize)
		}
		for _, other := range c.Keys[:i] {
			if bytes.Equal(k, other) {
				return nil, ruleErr(ErrInvalid, "gossip key %d is given twice", i)
			}
		}
	}
	s.keyring = Keyring{Keys: c.Keys, Generation: s.keyring.Generation + 1, UpdatedAt: c.At}
	return s.keyring, nil
}

// JoinGrant looks a grant up by id.
func (s *State) JoinGrant(id string) (JoinGrant, bool) {
	g, ok := s.grants[id]
	return g, ok
}

// JoinGrants lists the grants, sorted by id.
func (s *State) JoinGrants() []JoinGrant {
	return sortedValues(s.grants, func(g JoinGrant) string { return g.ID })
}

// RevokedMachines lists removed machines, sorted by id.
func (s *State) RevokedMachines() []Revoked {
	return sortedValues(s.revoked, func(r Revoked) string { return r.MachineID })
}

// Keyring is the gossip keyring; empty before the first rotation.
func (s *State) Keyring() Keyring { return s.keyring }
