package fsm

import (
	"fmt"
	"time"
)

// MigrationPhase is where a migration is. The order before the commit is
// planned, warm-copy, source-stopped, final-copy, target-starting; any of
// those may turn to aborting, then aborted. committed is the point of no
// return: after it only done follows.
type MigrationPhase string

// Migration phases, as written on the wire.
const (
	PhasePlanned        MigrationPhase = "planned"
	PhaseWarmCopy       MigrationPhase = "warm-copy"
	PhaseSourceStopped  MigrationPhase = "source-stopped"
	PhaseFinalCopy      MigrationPhase = "final-copy"
	PhaseTargetStarting MigrationPhase = "target-starting"
	PhaseCommitted      MigrationPhase = "committed"
	PhaseDone           MigrationPhase = "done"
	PhaseAborting       MigrationPhase = "aborting"
	PhaseAborted        MigrationPhase = "aborted"
)

// preCommit is the forward order of the phases before the commit.
var preCommit = []MigrationPhase{PhasePlanned, PhaseWarmCopy, PhaseSourceStopped, PhaseFinalCopy, PhaseTargetStarting}

// Terminal tells whether a migration in this phase is over.
func (p MigrationPhase) Terminal() bool { return p == PhaseDone || p == PhaseAborted }

// Committed tells whether ownership has moved.
func (p MigrationPhase) Committed() bool { return p == PhaseCommitted || p == PhaseDone }

func phaseIndex(p MigrationPhase) int {
	for i, q := range preCommit {
		if q == p {
			return i
		}
	}
	return -1
}

// MigrationVolume is one volume's progress.
type MigrationVolume struct {
	Name         string `json:"name"`
	BytesSent    uint64 `json:"bytes_sent"`
	LastSnapshot string `json:"last_snapshot,omitempty"` // newest snapshot both sides hold
	GUID         uint64 `json:"guid,omitempty"`          // its GUID, checked on the target
	TotalBytes   uint64 `json:"total_bytes,omitempty"`   // referenced size on the source at the start
	FinalBytes   uint64 `json:"final_bytes,omitempty"`   // sent after the source stopped
	Base         string `json:"base,omitempty"`          // snapshot the target held already, if one was used
}

// Migration is one move of a service and its volumes.
type Migration struct {
	ID              string            `json:"id"`
	Namespace       string            `json:"namespace"`
	Service         string            `json:"service"`
	SourceID        string            `json:"source_id"`
	TargetID        string            `json:"target_id"`
	Holder          string            `json:"holder"` // of the namespace lock
	Phase           MigrationPhase    `json:"phase"`
	Volumes         []MigrationVolume `json:"volumes"`
	Error           string            `json:"error,omitempty"`
	StartedAt       time.Time         `json:"started_at"`
	UpdatedAt       time.Time         `json:"updated_at"`
	SourceStoppedAt time.Time         `json:"source_stopped_at,omitzero"`
	TargetReadyAt   time.Time         `json:"target_ready_at,omitzero"`
	CommittedAt     time.Time         `json:"committed_at,omitzero"`
	EndedAt         time.Time         `json:"ended_at,omitzero"`         // done or aborted
	SourcePurgedAt  time.Time         `json:"source_purged_at,omitzero"` // retained source copy destroyed
	RollbackOf      string            `json:"rollback_of,omitempty"`     // the migration this one reverses
	Cutover         *Cutover          `json:"cutover,omitempty"`         // the downtime, phase by phase
}

// Cutover breaks a move's downtime down, phase by phase, as its executor
// measured it. Prepared happened before the source stopped and is not
// downtime; the rest is, in order. Adopt is zero when the copies were
// put in place before the stop (as this version does).
type Cutover struct {
	Prepared      time.Duration `json:"prepared_ns"`       // before the stop: copies in place, container created
	Stop          time.Duration `json:"stop_ns"`           // the source's container stopped
	FinalSnapshot time.Duration `json:"final_snapshot_ns"` // the final snapshots taken
	FinalSend     time.Duration `json:"final_send_ns"`     // the final increments sent and received in place
	Adopt         time.Duration `json:"adopt_ns"`          // copies put in place during the cutover
	Start         time.Duration `json:"start_ns"`          // the target's container started
	Ready         time.Duration `json:"ready_ns"`          // until its readiness check passed
	Commit        time.Duration `json:"commit_ns"`         // the commit proposed and applied
	Total         time.Duration `json:"total_ns"`          // from the stop to the commit applied
	FinalBytes    uint64        `json:"final_bytes"`       // sent after the stop, all volumes
	// Held: the target's container was started before the stop under
	// drover-hold, and Start is its release, not a container start.
	Held bool `json:"held,omitempty"`
}

// Downtime is the time from the source's stop to the target's readiness,
// zero until both happened.
func (m Migration) Downtime() time.Duration {
	if m.SourceStoppedAt.IsZero() || m.TargetReadyAt.IsZero() {
		return 0
	}
	return m.TargetReadyAt.Sub(m.SourceStoppedAt)
}

// StartMigration records a migration in phase planned. The holder must
// hold the namespace's lock; the service must exist; the target must be
// another, active machine; no other migration of the service may be
// running. Result: Migration.
type StartMigration struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
	TargetID  string `json:"target_id"`
	Holder    string `json:"holder"`
	// Volumes, when given, seeds each volume's progress: a base snapshot
	// the target holds already (so the first round is incremental) and
	// the total size. Every volume of the service must be listed once.
	Volumes    []MigrationVolume `json:"volumes,omitempty"`
	RollbackOf string            `json:"rollback_of,omitempty"`
	At         time.Time         `json:"at"`
}

// AdvanceMigration moves a migration to another phase before or after the
// commit (never across it: that is CommitMigration), recording progress.
// Result: Migration.
type AdvanceMigration struct {
	ID      string            `json:"id"`
	Phase   MigrationPhase    `json:"phase"`
	Volumes []MigrationVolume `json:"volumes,omitempty"` // replaces the progress when given
	Error   string            `json:"error,omitempty"`
	// Cutover, when given, records the downtime's breakdown (with done).
	Cutover *Cutover  `json:"cutover,omitempty"`
	At      time.Time `json:"at"`
}

// CommitMigration is the point of no return, in one command: the volumes'
// owner and the service's machine become the target (and with them the
// service IP's route). Allowed only from target-starting, by the holder of
// the namespace lock. Result: Migration.
type CommitMigration struct {
	ID      string    `json:"id"`
	Holder  string    `json:"holder"`
	ReadyAt time.Time `json:"ready_at,omitzero"` // when the target answered ready
	At      time.Time `json:"at"`
}

// PurgeSource records that the source's retained copy of a done
// migration was destroyed; a rollback needs it, so none is possible
// after. Result: Migration.
type PurgeSource struct {
	ID string    `json:"id"`
	At time.Time `json:"at"`
}

// Type implements Command.
func (PurgeSource) Type() CommandType { return CmdPurgeSource }

// Type implements Command.
func (StartMigration) Type() CommandType { return CmdStartMigration }

// Type implements Command.
func (AdvanceMigration) Type() CommandType { return CmdAdvanceMigration }

// Type implements Command.
func (CommitMigration) Type() CommandType { return CmdCommitMigration }

func (s *State) startMigration(c StartMigration) (any, *RuleError) {
	if !validID(c.ID) {
		return nil, ruleErr(ErrInvalid, "migration id %q: want 1-64 of a-z, 0-9 and -", c.ID)
	}
	if _, dup := s.migrations[c.ID]; dup {
		return nil, ruleErr(ErrInvalid, "migration %s exists already", c.ID)
	}
	if err := s.requireLock(c.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	sv, ok := s.services[c.Namespace+"/"+c.Service]
	if !ok {
		return nil, ruleErr(ErrUnknownService, "no service %s/%s", c.Namespace, c.Service)
	}
	target, ok := s.machines[c.TargetID]
	if !ok {
		return nil, ruleErr(ErrUnknownMachine, "no machine with id %q", c.TargetID)
	}
	if c.TargetID == sv.MachineID {
		return nil, ruleErr(ErrInvalid, "service %s already runs on %s", sv.Key(), target.Name)
	}
	if target.State != MachineActive {
		return nil, ruleErr(ErrInvalid, "machine %s is %s: it takes no new placements", target.Name, target.State)
	}
	if m, busy := s.ActiveMigration(c.Namespace, c.Service); busy {
		return nil, ruleErr(ErrInvalid, "service %s is being moved already by migration %s (%s)", sv.Key(), m.ID, m.Phase)
	}
	m := Migration{ID: c.ID, Namespace: c.Namespace, Service: c.Service, SourceID: sv.MachineID, TargetID: c.TargetID,
		Holder: c.Holder, Phase: PhasePlanned, StartedAt: c.At, UpdatedAt: c.At, RollbackOf: c.RollbackOf}
	seeded := map[string]MigrationVolume{}
	for _, v := range c.Volumes {
		seeded[v.Name] = v
	}
	if c.Volumes != nil && len(seeded) != len(sv.Spec.Volumes) {
		return nil, ruleErr(ErrInvalid, "migration %s lists %d volumes, service %s has %d", c.ID, len(c.Volumes), sv.Key(), len(sv.Spec.Volumes))
	}
	for _, v := range sv.Spec.Volumes {
		mv, ok := seeded[v.Name]
		if c.Volumes != nil && !ok {
			return nil, ruleErr(ErrInvalid, "migration %s does not list volume %s of service %s", c.ID, v.Name, sv.Key())
		}
		mv.Name, mv.BytesSent, mv.FinalBytes = v.Name, 0, 0
		mv.Base = mv.LastSnapshot
		m.Volumes = append(m.Volumes, mv)
	}
	s.migrations[c.ID] = m
	return m, nil
}

func (s *State) advanceMigration(c AdvanceMigration) (any, *RuleError) {
	m, err := s.knownMigration(c.ID)
	if err != nil {
		return nil, err
	}
	from, to := m.Phase, c.Phase
	var allowed bool
	switch {
	case from.Terminal():
		allowed = false
	case from.Committed():
		allowed = from == PhaseCommitted && to == PhaseDone
	case to == PhaseAborting:
		allowed = from != PhaseAborting
	case to == PhaseAborted:
		allowed = from == PhaseAborting
	case from == PhaseAborting:
		allowed = false
	default:
		allowed = phaseIndex(to) >= phaseIndex(from) && phaseIndex(to) >= 0
	}
	if !allowed {
		msg := fmt.Sprintf("migration %s cannot go from %s to %s", c.ID, from, to)
		if from.Committed() {
			msg += ": after the commit a migration only goes forward"
		}
		return nil, &RuleError{Code: ErrInvalid.Code, Message: msg}
	}
	m.Phase, m.UpdatedAt = to, c.At
	if c.Volumes != nil {
		m.Volumes = c.Volumes
	}
	if c.Error != "" {
		m.Error = c.Error
	}
	if c.Cutover != nil {
		cut := *c.Cutover
		m.Cutover = &cut
	}
	if to == PhaseSourceStopped && m.SourceStoppedAt.IsZero() {
		m.SourceStoppedAt = c.At
	}
	if to.Terminal() {
		m.EndedAt = c.At
	}
	s.migrations[c.ID] = m
	return m, nil
}

func (s *State) commitMigration(c CommitMigration) (any, *RuleError) {
	m, err := s.knownMigration(c.ID)
	if err != nil {
		return nil, err
	}
	if m.Phase != PhaseTargetStarting {
		return nil, ruleErr(ErrInvalid, "migration %s is %s: only a migration whose target started may commit", c.ID, m.Phase)
	}
	if err := s.requireLock(m.Namespace, c.Holder, c.At); err != nil {
		return nil, err
	}
	key := m.Namespace + "/" + m.Service
	sv, ok := s.services[key]
	if !ok {
		return nil, ruleErr(ErrUnknownService, "no service %s", key)
	}
	for _, v := range m.Volumes {
		vk := m.Namespace + "/" + v.Name
		vol, ok := s.volumes[vk]
		if !ok || vol.OwnerID != m.SourceID {
			return nil, ruleErr(ErrVolumeElsewhere, "volume %s is not owned by the source any more", vk)
		}
	}
	for _, v := range m.Volumes {
		vk := m.Namespace + "/" + v.Name
		vol := s.volumes[vk]
		vol.OwnerID = m.TargetID
		s.volumes[vk] = vol
	}
	if sv.StandbyID == m.TargetID {
		// Moved onto its standby: the source, which keeps its copy,
		// becomes the standby.
		sv.StandbyID, sv.Replica = m.SourceID, nil
		if sv.Spec.Standby != nil && sv.Spec.Standby.Machine != "" {
			sv.Spec.Standby.Machine = s.machines[m.SourceID].Name
		}
	}
	sv.MachineID, sv.UpdatedAt = m.TargetID, c.At
	if sv.Spec.Machine != "" {
		// A pinned placement follows the move, so the manifest that asked
		// for the move reads as unchanged afterwards.
		sv.Spec.Machine = s.machines[m.TargetID].Name
	}
	s.services[key] = sv
	m.Phase, m.CommittedAt, m.UpdatedAt = PhaseCommitted, c.At, c.At
	m.TargetReadyAt = c.ReadyAt
	if m.TargetReadyAt.IsZero() {
		m.TargetReadyAt = c.At
	}
	s.migrations[c.ID] = m
	return m, nil
}

func (s *State) purgeSource(c PurgeSource) (any, *RuleError) {
	m, err := s.knownMigration(c.ID)
	if err != nil {
		return nil, err
	}
	if m.Phase != PhaseDone {
		return nil, ruleErr(ErrInvalid, "migration %s is %s: only a done migration left a source copy behind", c.ID, m.Phase)
	}
	if m.SourcePurgedAt.IsZero() {
		m.SourcePurgedAt, m.UpdatedAt = c.At, c.At
		s.migrations[c.ID] = m
	}
	return m, nil
}

// knownMigration looks up the migration a command names.
func (s *State) knownMigration(id string) (Migration, *RuleError) {
	m, ok := s.migrations[id]
	if !ok {
		return m, ruleErr(ErrUnknownMigration, "no migration %q", id)
	}
	return m, nil
}

// ActiveMigration finds the running migration of a service, if any.
func (s *State) ActiveMigration(namespace, service string) (Migration, bool) {
	for _, m := range s.migrations {
		if m.Namespace == namespace && m.Service == service && !m.Phase.Terminal() {
			return m, true
		}
	}
	return Migration{}, false
}

// Migrations lists the migrations, oldest first.
func (s *State) Migrations() []Migration {
	return sortedValues(s.migrations, func(m Migration) string { return m.StartedAt.UTC().Format(time.RFC3339Nano) + m.ID })
}

// Migration looks a migration up by id.
func (s *State) Migration(id string) (Migration, bool) {
	m, ok := s.migrations[id]
	return m, ok
}
