package fsm

import "time"

// DrainState is where a drain stands.
type DrainState string

// Drain states. Running is the only one that is not final.
const (
	DrainRunning    DrainState = "running"
	DrainDrained    DrainState = "drained"    // nothing left on the machine
	DrainIncomplete DrainState = "incomplete" // ended with services left, each with its reason
	DrainCancelled  DrainState = "cancelled"  // the machine was activated
)

// DrainItemState is where one service of a drain stands.
type DrainItemState string

// Drain item states.
const (
	ItemPending   DrainItemState = "pending"   // planned, not started
	ItemMigrating DrainItemState = "migrating" // its migration runs
	ItemMoved     DrainItemState = "moved"     // migration done
	ItemStays     DrainItemState = "stays"     // cannot move (reason); left running
	ItemFailed    DrainItemState = "failed"    // its migration aborted (reason); left running
	ItemSkipped   DrainItemState = "skipped"   // not started: deadline passed or drain cancelled
)

// DrainItem is one service of a drain.
type DrainItem struct {
	Service   string         `json:"service"` // namespace/name
	Target    string         `json:"target,omitempty"`
	State     DrainItemState `json:"state"`
	Migration string         `json:"migration,omitempty"` // the latest one
	Attempts  int            `json:"attempts,omitempty"`  // migrations started for it
	Reason    string         `json:"reason,omitempty"`
}

// Drain is the latest drain of a machine: its plan and where each service
// stands. It outlives the daemon that runs it: a restarted executor
// resumes a running drain it holds.
type Drain struct {
	MachineID string      `json:"machine_id"`
	Executor  string      `json:"executor"` // machine that runs it
	Parallel  int         `json:"parallel"`
	Deadline  time.Time   `json:"deadline,omitzero"`
	State     DrainState  `json:"state"`
	Items     []DrainItem `json:"items"`
	StartedAt time.Time   `json:"started_at"`
	EndedAt   time.Time   `json:"ended_at,omitzero"`
	Note      string      `json:"note,omitempty"` // why it ended as it did
}

// Left counts the items that did not move.
func (d Drain) Left() int {
	n := 0
	for _, it := range d.Items {
		if it.State != ItemMoved {
			n++
		}
	}
	return n
}

// StartDrain marks a machine draining and records the plan. Refused while
// another drain of it runs. Result: Drain.
type StartDrain struct {
	Drain Drain     `json:"drain"`
	At    time.Time `json:"at"`
}

// UpdateDrainItem records where one service of a running drain stands.
// Result: Drain.
type UpdateDrainItem struct {
	MachineID string    `json:"machine_id"`
	Item      DrainItem `json:"item"`
	At        time.Time `json:"at"`
}

// EndDrain ends a running drain. Drained also marks the machine drained
// and is refused while a service or a volume is left on it. Result: Drain.
type EndDrain struct {
	MachineID string     `json:"machine_id"`
	State     DrainState `json:"state"`
	Note      string     `json:"note,omitempty"`
	At        time.Time  `json:"at"`
}

// Type implements Command.
func (StartDrain) Type() CommandType { return CmdStartDrain }

// Type implements Command.
func (UpdateDrainItem) Type() CommandType { return CmdUpdateDrainItem }

// Type implements Command.
func (EndDrain) Type() CommandType { return CmdEndDrain }

func (s *State) startDrain(c StartDrain) (any, *RuleError) {
	d := c.Drain
	m, ok := s.machines[d.MachineID]
	if !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", d.MachineID)
	}
	if _, ok := s.machines[d.Executor]; !ok {
		return nil, ruleErr(ErrUnknownMachine, "drain executor: no machine with id %q", d.Executor)
	}
	if old, ok := s.drains[d.MachineID]; ok && old.State == DrainRunning {
		return nil, ruleErr(ErrDrainRunning, "machine %s is being drained by %s since %s", m.Name, s.NameOf(old.Executor), old.StartedAt.Format(time.RFC3339))
	}
	if d.Parallel < 1 {
		return nil, ruleErr(ErrInvalid, "drain of %s: parallel %d, want at least 1", m.Name, d.Parallel)
	}
	seen := map[string]bool{}
	for _, it := range d.Items {
		if seen[it.Service] {
			return nil, ruleErr(ErrInvalid, "drain of %s: service %s planned twice", m.Name, it.Service)
		}
		seen[it.Service] = true
		if it.State != ItemPending && it.State != ItemStays {
			return nil, ruleErr(ErrInvalid, "drain of %s: service %s starts %s, want pending or stays", m.Name, it.Service, it.State)
		}
	}
	d.State, d.StartedAt, d.EndedAt, d.Note = DrainRunning, c.At, time.Time{}, ""
	s.drains[d.MachineID] = d
	m.State, m.UpdatedAt = MachineDraining, c.At
	s.machines[m.ID] = m
	return d, nil
}

func (s *State) runningDrain(machineID string) (Drain, *RuleError) {
	d, ok := s.drains[machineID]
	if !ok || d.State != DrainRunning {
		return d, ruleErr(ErrNoDrain, "no drain of machine %s is running", s.NameOf(machineID))
	}
	return d, nil
}

func (s *State) updateDrainItem(c UpdateDrainItem) (any, *RuleError) {
	d, err := s.runningDrain(c.MachineID)
	if err != nil {
		return nil, err
	}
	items := append([]DrainItem(nil), d.Items...)
	for i, it := range items {
		if it.Service == c.Item.Service {
			items[i] = c.Item
			d.Items = items
			s.drains[c.MachineID] = d
			return d, nil
		}
	}
	return nil, ruleErr(ErrInvalid, "service %s is not in the drain of %s", c.Item.Service, s.NameOf(c.MachineID))
}

func (s *State) endDrain(c EndDrain) (any, *RuleError) {
	d, err := s.runningDrain(c.MachineID)
	if err != nil {
		return nil, err
	}
	switch c.State {
	case DrainDrained:
		if left := s.heldBy(c.MachineID); len(left) > 0 {
			return nil, ruleErr(ErrInvalid, "machine %s still holds %s: not drained", s.NameOf(c.MachineID), left[0])
		}
		m := s.machines[c.MachineID]
		m.State, m.UpdatedAt = MachineDrained, c.At
		s.machines[m.ID] = m
	case DrainIncomplete, DrainCancelled:
	default:
		return nil, ruleErr(ErrInvalid, "a drain ends drained, incomplete or cancelled, not %q", c.State)
	}
	d.State, d.EndedAt, d.Note = c.State, c.At, c.Note
	s.drains[c.MachineID] = d
	return d, nil
}

// heldBy names what a machine holds: its services and its volumes.
func (s *State) heldBy(machineID string) []string {
	var out []string
	for _, sv := range s.Services() {
		if sv.MachineID == machineID {
			out = append(out, "service "+sv.Key())
		}
	}
	for _, v := range s.Volumes() {
		if v.OwnerID == machineID {
			out = append(out, "volume "+v.Key())
		}
	}
	return out
}

// NameOf gives a machine's name, or the id when it is unknown.
func (s *State) NameOf(id string) string {
	if m, ok := s.machines[id]; ok {
		return m.Name
	}
	return id
}

// Drain gives a machine's latest drain.
func (s *State) Drain(machineID string) (Drain, bool) {
	d, ok := s.drains[machineID]
	return d, ok
}

// Drains lists the latest drain of every machine that had one.
func (s *State) Drains() []Drain {
	return sortedValues(s.drains, func(d Drain) string { return d.MachineID })
}
