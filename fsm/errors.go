package fsm

import (
	"fmt"
	"time"
)

// ErrorCode names a rule of the store that a command broke. Codes are
// part of the wire format: they cross machines and reach the CLI.
type ErrorCode string

// RuleError is the result of a command that breaks a rule of the store.
// The state is unchanged. It round-trips through JSON and matches with
// errors.Is against the Err* values by Code.
type RuleError struct {
	Code    ErrorCode `json:"code"`
	Message string    `json:"message"`
	Holder  string    `json:"holder,omitempty"` // lock errors: the current holder
	Since   time.Time `json:"since,omitzero"`   // lock errors: when it took the lock
}

// Rule errors, to match with errors.Is.
var (
	ErrInvalid          = &RuleError{Code: "invalid"}
	ErrUnknownMachine   = &RuleError{Code: "unknown_machine"}
	ErrNameTaken        = &RuleError{Code: "name_taken"}
	ErrLockHeld         = &RuleError{Code: "lock_held"}
	ErrLockNotHeld      = &RuleError{Code: "lock_not_held"}
	ErrOverlayExhausted = &RuleError{Code: "overlay_exhausted"}
	ErrUnknownService   = &RuleError{Code: "unknown_service"}
	ErrVolumeElsewhere  = &RuleError{Code: "volume_elsewhere"}
	ErrUnknownMigration = &RuleError{Code: "unknown_migration"}
	ErrDrainRunning     = &RuleError{Code: "drain_running"}
	ErrNoDrain          = &RuleError{Code: "no_drain"}
	ErrMachineHolds     = &RuleError{Code: "machine_holds"}
	ErrMachineBusy      = &RuleError{Code: "machine_busy"}
	ErrUnknownSecret    = &RuleError{Code: "unknown_secret"}
	ErrConflict         = &RuleError{Code: "conflict"}
	ErrNoStandby        = &RuleError{Code: "no_standby"}
	ErrLeaseHeld        = &RuleError{Code: "lease_held"}
)

func (e *RuleError) Error() string {
	if e.Message == "" {
		return string(e.Code)
	}
	return e.Message
}

// Is matches another *RuleError with the same code.
func (e *RuleError) Is(target error) bool {
	t, ok := target.(*RuleError)
	return ok && t.Code == e.Code
}

func ruleErr(code *RuleError, format string, args ...any) *RuleError {
	return &RuleError{Code: code.Code, Message: fmt.Sprintf(format, args...)}
}
