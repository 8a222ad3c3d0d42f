package fsm

import (
	"maps"
	"net/netip"
	"strings"
	"time"
)

// MachineState is a machine's administrative state.
type MachineState string

// Machine states, as written on the wire.
const (
	MachineActive   MachineState = "active"
	MachineDraining MachineState = "draining"
	MachineDrained  MachineState = "drained"
	MachineGone     MachineState = "gone"
)

func (s MachineState) valid() bool {
	switch s {
	case MachineActive, MachineDraining, MachineDrained, MachineGone:
		return true
	}
	return false
}

// Capacity is what a machine offers to services.
type Capacity struct {
	MemoryBytes uint64 `json:"memory_bytes"`
	DiskBytes   uint64 `json:"disk_bytes"`
}

// Machine is one machine of the cluster.
type Machine struct {
	ID           string       `json:"id"`
	Name         string       `json:"name"`
	GossipAddr   string       `json:"gossip_addr"`
	RaftAddr     string       `json:"raft_addr"`
	RPCAddr      string       `json:"rpc_addr"`
	WGPublicKey  string       `json:"wg_public_key"`
	WGEndpoint   string       `json:"wg_endpoint"`
	OverlayIP    netip.Addr   `json:"overlay_ip"` // zero until allocated
	Capacity     Capacity     `json:"capacity"`
	State        MachineState `json:"state"`
	RegisteredAt time.Time    `json:"registered_at"`
	UpdatedAt    time.Time    `json:"updated_at"`
}

// RegisterMachine adds a machine or updates what it reports about itself
// (addresses, key, endpoint, capacity, name). State, overlay IP and
// registration time are kept. A machine the facts do not hold yet is
// admitted with Grant, the join grant it proved it holds: the grant must
// be usable and the machine not revoked. Entries without Grant predate
// join grants and are applied as they were. Result: the stored Machine.
type RegisterMachine struct {
	Machine Machine   `json:"machine"`
	Grant   string    `json:"grant,omitempty"`
	At      time.Time `json:"at"`
}

// SetMachineState changes a machine's administrative state. Making it
// active cancels a running drain of it. Result: Machine.
type SetMachineState struct {
	ID    string       `json:"id"`
	State MachineState `json:"state"`
	At    time.Time    `json:"at"`
}

// RemoveMachine forgets a machine, frees its overlay IP and revokes its
// id and WireGuard key: it is never admitted again. It is refused
// while a migration to or from the machine runs, and while the machine
// holds services or volumes unless Force, which forgets those too (their
// data is lost with the machine). Result: []string, what was forgotten
// with it.
type RemoveMachine struct {
	ID    string    `json:"id"`
	Force bool      `json:"force,omitempty"`
	At    time.Time `json:"at"`
}

// AllocateOverlayIP gives a machine the lowest free address of Prefix, or
// the one it already holds there. Result: netip.Addr.
type AllocateOverlayIP struct {
	MachineID string       `json:"machine_id"`
	Prefix    netip.Prefix `json:"prefix"`
	At        time.Time    `json:"at"`
}

// Type implements Command.
func (RegisterMachine) Type() CommandType { return CmdRegisterMachine }

// Type implements Command.
func (SetMachineState) Type() CommandType { return CmdSetMachineState }

// Type implements Command.
func (RemoveMachine) Type() CommandType { return CmdRemoveMachine }

// Type implements Command.
func (AllocateOverlayIP) Type() CommandType { return CmdAllocateOverlayIP }

func validID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// ValidName tells whether s is a DNS label: 1-63 of [a-z0-9-], not
// starting or ending with '-'. Machine, namespace, service and volume
// names all are.
func ValidName(s string) bool {
	return validID(s) && len(s) <= 63 && s[0] != '-' && s[len(s)-1] != '-'
}

func (s *State) registerMachine(c RegisterMachine) (any, *RuleError) {
	m := c.Machine
	if !validID(m.ID) {
		return nil, ruleErr(ErrInvalid, "machine id %q: want 1-64 of a-z, 0-9 and -", m.ID)
	}
	if !ValidName(m.Name) {
		return nil, ruleErr(ErrInvalid, "machine name %q is not a DNS label", m.Name)
	}
	if other, ok := s.MachineByName(m.Name); ok && other.ID != m.ID {
		return nil, ruleErr(ErrNameTaken, "machine name %q is taken by machine %s", m.Name, other.ID)
	}
	old, exists := s.machines[m.ID]
	if !exists && c.Grant != "" {
		if err := s.admitWithGrant(m, c.Grant, c.At); err != nil {
			return nil, err
		}
	}
	if exists {
		m.State, m.OverlayIP, m.RegisteredAt = old.State, old.OverlayIP, old.RegisteredAt
	} else {
		m.State, m.OverlayIP, m.RegisteredAt = MachineActive, netip.Addr{}, c.At
	}
	m.UpdatedAt = c.At
	s.machines[m.ID] = m
	return m, nil
}

func (s *State) setMachineState(c SetMachineState) (any, *RuleError) {
	m, ok := s.machines[c.ID]
	if !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", c.ID)
	}
	if !c.State.valid() {
		return nil, ruleErr(ErrInvalid, "machine state %q: want active, draining, drained or gone", c.State)
	}
	if d, ok := s.drains[c.ID]; ok && d.State == DrainRunning && c.State == MachineActive {
		d.State, d.EndedAt, d.Note = DrainCancelled, c.At, "machine activated"
		s.drains[c.ID] = d
	}
	m.State, m.UpdatedAt = c.State, c.At
	s.machines[c.ID] = m
	return m, nil
}

func (s *State) removeMachine(c RemoveMachine) (any, *RuleError) {
	m, ok := s.machines[c.ID]
	if !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", c.ID)
	}
	for _, mg := range s.migrations {
		if !mg.Phase.Terminal() && (mg.SourceID == c.ID || mg.TargetID == c.ID) {
			return nil, ruleErr(ErrMachineBusy, "migration %s of %s/%s involves %s and is %s: let it end or abort it first", mg.ID, mg.Namespace, mg.Service, m.Name, mg.Phase)
		}
	}
	held := s.heldBy(c.ID)
	if len(held) > 0 && !c.Force {
		return nil, ruleErr(ErrMachineHolds, "machine %s still holds %s", m.Name, strings.Join(held, ", "))
	}
	for k, sv := range s.services {
		if sv.MachineID == c.ID {
			delete(s.services, k)
		}
	}
	for k, v := range s.volumes {
		if v.OwnerID == c.ID {
			delete(s.volumes, k)
		}
	}
	delete(s.drains, c.ID)
	delete(s.machines, c.ID)
	if _, wrapped := s.secretsKey.Wraps[c.ID]; wrapped {
		// Its copy of the secrets key goes with it (a copy of the map:
		// clones of the state share it).
		wraps := maps.Clone(s.secretsKey.Wraps)
		delete(wraps, c.ID)
		s.secretsKey.Wraps = wraps
	}
	s.revoked[c.ID] = Revoked{MachineID: m.ID, Name: m.Name, WGPublicKey: m.WGPublicKey, At: c.At}
	if held == nil {
		held = []string{}
	}
	return held, nil
}

func (s *State) allocateOverlayIP(c AllocateOverlayIP) (any, *RuleError) {
	m, ok := s.machines[c.MachineID]
	if !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", c.MachineID)
	}
	p := c.Prefix
	if !p.IsValid() || p != p.Masked() || p.Bits() > p.Addr().BitLen()-2 {
		return nil, ruleErr(ErrInvalid, "overlay prefix %q is not a network with room for hosts", p)
	}
	if m.OverlayIP.IsValid() && p.Contains(m.OverlayIP) {
		return m.OverlayIP, nil
	}
	held := map[netip.Addr]bool{}
	for _, o := range s.machines {
		if o.OverlayIP.IsValid() {
			held[o.OverlayIP] = true
		}
	}
	last := lastAddr(p)
	for a := p.Addr().Next(); a.IsValid() && p.Contains(a); a = a.Next() {
		if p.Addr().Is4() && a == last {
			break // IPv4 broadcast
		}
		if !held[a] {
			m.OverlayIP, m.UpdatedAt = a, c.At
			s.machines[m.ID] = m
			return a, nil
		}
	}
	return nil, ruleErr(ErrOverlayExhausted, "no free address left in overlay prefix %s", p)
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - uint(i%8))
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// Machines lists the machines, sorted by name.
func (s *State) Machines() []Machine {
	return sortedValues(s.machines, func(m Machine) string { return m.Name })
}

// Machine looks a machine up by id.
func (s *State) Machine(id string) (Machine, bool) {
	m, ok := s.machines[id]
	return m, ok
}

// MachineByName looks a machine up by name.
func (s *State) MachineByName(name string) (Machine, bool) {
	for _, m := range s.machines {
		if m.Name == name {
			return m, true
		}
	}
	return Machine{}, false
}
