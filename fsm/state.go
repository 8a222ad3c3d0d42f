package fsm

import (
	"maps"
	"slices"
	"strings"
)

// State is the whole set of facts. It is not safe for concurrent use; the
// Raft shell serialises access.
type State struct {
	machines   map[string]Machine   // by id
	locks      map[string]Lock      // by namespace
	services   map[string]Service   // by namespace/name
	volumes    map[string]Volume    // by namespace/name
	migrations map[string]Migration // by id
	drains     map[string]Drain     // by machine id: its latest drain
	grants     map[string]JoinGrant // by id
	revoked    map[string]Revoked   // by machine id
	keyring    Keyring
	secrets    map[string]Secret // by namespace/name
	secretsKey SecretsKey
	leases     map[string]Lease // by machine id
}

// NewState returns an empty state.
func NewState() *State {
	return &State{machines: map[string]Machine{}, locks: map[string]Lock{}, services: map[string]Service{}, volumes: map[string]Volume{}, migrations: map[string]Migration{}, drains: map[string]Drain{},
		grants: map[string]JoinGrant{}, revoked: map[string]Revoked{}, secrets: map[string]Secret{}, leases: map[string]Lease{}}
}

// Apply decodes and applies one log entry. Time comes only from the
// command. A decode failure wraps ErrUndecodable or ErrUnknownCommand (the
// caller must stop); a broken rule returns a *RuleError and changes
// nothing; success returns the command's result.
func (s *State) Apply(data []byte) (any, error) {
	c, err := Decode(data)
	if err != nil {
		return nil, err
	}
	return s.ApplyCommand(c)
}

// ApplyCommand applies an already decoded command.
func (s *State) ApplyCommand(c Command) (any, error) {
	h, ok := handlers[c.Type()]
	if !ok {
		return nil, ErrUnknownCommand
	}
	res, rule := h.apply(s, c)
	if rule != nil {
		return nil, rule
	}
	return res, nil
}

// Clone returns a deep copy.
func (s *State) Clone() *State {
	// Values are copied; a spec's slices and map are shared, which is
	// safe because nothing mutates a stored spec in place.
	return &State{machines: maps.Clone(s.machines), locks: maps.Clone(s.locks),
		services: maps.Clone(s.services), volumes: maps.Clone(s.volumes), migrations: maps.Clone(s.migrations), drains: maps.Clone(s.drains),
		grants: maps.Clone(s.grants), revoked: maps.Clone(s.revoked), keyring: s.keyring,
		secrets: maps.Clone(s.secrets), secretsKey: SecretsKey{ID: s.secretsKey.ID, Wraps: maps.Clone(s.secretsKey.Wraps)}, leases: maps.Clone(s.leases)}
}

// sortedValues returns a map's values sorted by key(v).
func sortedValues[V any](m map[string]V, key func(V) string) []V {
	out := slices.Collect(maps.Values(m))
	slices.SortFunc(out, func(a, b V) int { return strings.Compare(key(a), key(b)) })
	return out
}
