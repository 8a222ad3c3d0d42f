package fsm

import (
	"fmt"
	"time"
)

// StandbySpec asks for a standby copy of a service's volumes on another
// machine, refreshed every Interval, and says how a failover happens.
type StandbySpec struct {
	Machine  string        `json:"machine,omitempty"` // by name; empty: drover picks one
	Interval time.Duration `json:"interval"`
	Failover string        `json:"failover,omitempty"` // "manual" (default, written "") or "auto"
	After    time.Duration `json:"after,omitempty"`    // auto: how long after the lease ran out
}

// Failover policies.
const (
	FailoverManual = "manual"
	FailoverAuto   = "auto"
)

// Lease timing. An owner of a service with a standby renews its lease
// every StandbyLease/5 and stops such services once it has gone
// StandbyLease-LeaseStopMargin without a renewal it knows committed; a
// failover is allowed only ClockDriftMargin after the lease ran out, by
// the proposer's clock (agent/standby DESIGN.md has the argument).
const (
	StandbyLease     = 10 * time.Second
	LeaseStopMargin  = 3 * time.Second
	ClockDriftMargin = 2 * time.Second
)

// Replica is the newest snapshot of a service's volumes that its standby
// holds: what a failover would start from, and its age the data a
// failover would lose.
type Replica struct {
	MachineID string    `json:"machine_id"` // the standby
	Snapshot  string    `json:"snapshot"`
	TakenAt   time.Time `json:"taken_at"`
	Bytes     uint64    `json:"bytes"` // the increment that brought it
	At        time.Time `json:"at"`    // when it was recorded
}

// FailoverRecord is a service's last failover.
type FailoverRecord struct {
	From     string    `json:"from"`
	To       string    `json:"to"`
	At       time.Time `json:"at"`
	Snapshot string    `json:"snapshot"` // the replica it started from
	TakenAt  time.Time `json:"taken_at"` // what was written after this may be lost
	// Settled: the old owner saw it, kept its copy aside (KeptAs) and
	// counted what it had written after the snapshot (DivergedBytes, the
	// size of that increment).
	Settled       bool      `json:"settled,omitempty"`
	DivergedBytes uint64    `json:"diverged_bytes,omitempty"`
	KeptAs        []string  `json:"kept_as,omitempty"`
	SettledAt     time.Time `json:"settled_at,omitzero"`
}

// Lease is a machine's lease on the services with a standby it owns.
type Lease struct {
	MachineID string    `json:"machine_id"`
	Until     time.Time `json:"until"`
}

// validateStandby checks a spec's standby.
func validateStandby(sp ServiceSpec) error {
	st := sp.Standby
	if st == nil {
		return nil
	}
	if st.Interval < time.Second || st.Interval > 24*time.Hour {
		return fmt.Errorf("service %s: standby interval %s: want 1s to 24h", sp.Name, st.Interval)
	}
	switch st.Failover {
	case "", FailoverAuto:
	default:
		return fmt.Errorf("service %s: failover %q: want manual or auto", sp.Name, st.Failover)
	}
	if st.After < 0 || st.After > 24*time.Hour || (st.After > 0 && st.Failover != FailoverAuto) {
		return fmt.Errorf("service %s: failover after %s: 0 to 24h, with failover = \"auto\" only", sp.Name, st.After)
	}
	if len(sp.Binds) > 0 {
		return fmt.Errorf("service %s: a service with binds cannot have a standby: its host directories stay on its machine", sp.Name)
	}
	return nil
}

// RenewLease extends a machine's lease to At + Duration. Result: Lease.
type RenewLease struct {
	MachineID string        `json:"machine_id"`
	Duration  time.Duration `json:"duration"`
	At        time.Time     `json:"at"`
}

// Type implements Command.
func (RenewLease) Type() CommandType { return CmdRenewLease }

func (s *State) renewLease(c RenewLease) (any, *RuleError) {
	if _, ok := s.machines[c.MachineID]; !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", c.MachineID)
	}
	if c.Duration <= 0 || c.Duration > time.Minute {
		return nil, ruleErr(ErrInvalid, "lease of %s: want up to a minute", c.Duration)
	}
	l := Lease{MachineID: c.MachineID, Until: c.At.Add(c.Duration)}
	if old, ok := s.leases[c.MachineID]; ok && old.Until.After(l.Until) {
		l.Until = old.Until // a lease never shrinks
	}
	s.leases[c.MachineID] = l
	return l, nil
}

// LeaseOf returns a machine's lease.
func (s *State) LeaseOf(machineID string) (Lease, bool) {
	l, ok := s.leases[machineID]
	return l, ok
}

// Leases lists the leases, by machine id.
func (s *State) Leases() []Lease {
	return sortedValues(s.leases, func(l Lease) string { return l.MachineID })
}

// RecordReplica records that a service's standby holds Snapshot of every
// volume of the service. Only the service's owner records, and only for
// its standby. Result: Service.
type RecordReplica struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	OwnerID   string    `json:"owner_id"`
	StandbyID string    `json:"standby_id"`
	Snapshot  string    `json:"snapshot"`
	TakenAt   time.Time `json:"taken_at"`
	Bytes     uint64    `json:"bytes"`
	At        time.Time `json:"at"`
}

// Type implements Command.
func (RecordReplica) Type() CommandType { return CmdRecordReplica }

func (s *State) recordReplica(c RecordReplica) (any, *RuleError) {
	key := c.Namespace + "/" + c.Name
	sv, ok := s.services[key]
	switch {
	case !ok:
		return nil, ruleErr(ErrUnknownService, "no service %s", key)
	case sv.MachineID != c.OwnerID:
		return nil, ruleErr(ErrInvalid, "service %s runs on %s, not %s", key, sv.MachineID, c.OwnerID)
	case sv.StandbyID == "" || sv.StandbyID != c.StandbyID:
		return nil, ruleErr(ErrInvalid, "service %s has standby %q, not %s", key, sv.StandbyID, c.StandbyID)
	case c.Snapshot == "":
		return nil, ruleErr(ErrInvalid, "a replica needs its snapshot")
	}
	if sv.Replica != nil && sv.Replica.TakenAt.After(c.TakenAt) {
		return nil, ruleErr(ErrInvalid, "service %s has a newer replica (%s)", key, sv.Replica.Snapshot)
	}
	sv.Replica = &Replica{MachineID: c.StandbyID, Snapshot: c.Snapshot, TakenAt: c.TakenAt, Bytes: c.Bytes, At: c.At}
	s.services[key] = sv
	return sv, nil
}

// Failover moves a service whose owner's lease ran out to its standby,
// which starts it on its newest replica. Result: Service.
type Failover struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	To        string    `json:"to"` // the standby
	At        time.Time `json:"at"`
}

// Type implements Command.
func (Failover) Type() CommandType { return CmdFailover }

func (s *State) failover(c Failover) (any, *RuleError) {
	key := c.Namespace + "/" + c.Name
	sv, ok := s.services[key]
	if !ok {
		return nil, ruleErr(ErrUnknownService, "no service %s", key)
	}
	if sv.StandbyID == "" || sv.Replica == nil || sv.Replica.MachineID != sv.StandbyID {
		return nil, ruleErr(ErrNoStandby, "service %s has no standby with a replica", key)
	}
	if c.To != sv.StandbyID {
		return nil, ruleErr(ErrNoStandby, "machine %s is not the standby of %s (%s is)", s.NameOf(c.To), key, s.NameOf(sv.StandbyID))
	}
	if m, ok := s.ActiveMigration(c.Namespace, c.Name); ok {
		return nil, ruleErr(ErrInvalid, "migration %s of %s runs", m.ID, key)
	}
	if l, ok := s.leases[sv.MachineID]; ok && !c.At.After(l.Until.Add(ClockDriftMargin)) {
		return nil, ruleErr(ErrLeaseHeld, "the lease of %s on %s runs until %s (+%s for clock drift)",
			s.NameOf(sv.MachineID), key, l.Until.UTC().Format(time.RFC3339Nano), ClockDriftMargin)
	}
	from := sv.MachineID
	for _, v := range sv.Spec.Volumes {
		vk := c.Namespace + "/" + v.Name
		vol, ok := s.volumes[vk]
		if ok && vol.OwnerID == from {
			vol.OwnerID = c.To
			s.volumes[vk] = vol
		}
	}
	sv.LastFailover = &FailoverRecord{From: from, To: c.To, At: c.At, Snapshot: sv.Replica.Snapshot, TakenAt: sv.Replica.TakenAt}
	sv.MachineID, sv.StandbyID, sv.Replica, sv.UpdatedAt = c.To, from, nil, c.At
	sv.Status = ServiceStatus{}
	if sv.Spec.Machine != "" {
		sv.Spec.Machine = s.machines[c.To].Name
	}
	if sv.Spec.Standby != nil && sv.Spec.Standby.Machine != "" {
		sv.Spec.Standby.Machine = s.machines[from].Name
	}
	s.services[key] = sv
	return sv, nil
}

// SettleFailover is the old owner's word, once back, that it saw the
// failover: its diverged copy is kept aside and how much it had written
// after the replica is known. Result: Service.
type SettleFailover struct {
	Namespace     string    `json:"namespace"`
	Name          string    `json:"name"`
	MachineID     string    `json:"machine_id"`
	DivergedBytes uint64    `json:"diverged_bytes"`
	KeptAs        []string  `json:"kept_as,omitempty"`
	At            time.Time `json:"at"`
}

// Type implements Command.
func (SettleFailover) Type() CommandType { return CmdSettleFailover }

func (s *State) settleFailover(c SettleFailover) (any, *RuleError) {
	key := c.Namespace + "/" + c.Name
	sv, ok := s.services[key]
	if !ok {
		return nil, ruleErr(ErrUnknownService, "no service %s", key)
	}
	f := sv.LastFailover
	if f == nil || f.From != c.MachineID || f.Settled {
		return nil, ruleErr(ErrInvalid, "service %s has no unsettled failover from %s", key, c.MachineID)
	}
	settled := *f
	settled.Settled, settled.DivergedBytes, settled.KeptAs, settled.SettledAt = true, c.DivergedBytes, c.KeptAs, c.At
	sv.LastFailover = &settled
	s.services[key] = sv
	return sv, nil
}
