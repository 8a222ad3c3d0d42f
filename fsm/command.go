// Package fsm holds drover's facts and the typed commands that change
// them. It is pure: no I/O beyond the snapshot writer and reader it is
// given, no clocks (time comes in each command), no goroutines.
package fsm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// CommandType is the first byte of every log entry. Numbers are written
// out by hand and only ever appended; a number is never reused.
type CommandType uint8

// Command types. Append only.
const (
	CmdRegisterMachine    CommandType = 1
	CmdSetMachineState    CommandType = 2
	CmdRemoveMachine      CommandType = 3
	CmdAcquireLock        CommandType = 4
	CmdRenewLock          CommandType = 5
	CmdReleaseLock        CommandType = 6
	CmdExpireLocks        CommandType = 7
	CmdAllocateOverlayIP  CommandType = 8
	CmdPutService         CommandType = 9
	CmdRemoveService      CommandType = 10
	CmdSetServiceStatus   CommandType = 11
	CmdStartMigration     CommandType = 12
	CmdAdvanceMigration   CommandType = 13
	CmdCommitMigration    CommandType = 14
	CmdPurgeSource        CommandType = 15
	CmdStartDrain         CommandType = 16
	CmdUpdateDrainItem    CommandType = 17
	CmdEndDrain           CommandType = 18
	CmdProbe              CommandType = 19
	CmdIssueJoinGrant     CommandType = 20
	CmdSetKeyring         CommandType = 21
	CmdRemoveVolume       CommandType = 22
	CmdAddSecretsKeyWraps CommandType = 23
	CmdPutSecret          CommandType = 24
	CmdRemoveSecret       CommandType = 25
	CmdRenewLease         CommandType = 26
	CmdRecordReplica      CommandType = 27
	CmdFailover           CommandType = 28
	CmdSettleFailover     CommandType = 29
)

// Command is one typed change of the facts.
type Command interface {
	Type() CommandType
}

// Errors of Decode. A log entry that fails to decode stops the node.
var (
	ErrUndecodable    = errors.New("undecodable command")
	ErrUnknownCommand = errors.New("unknown command type")
)

// handler is one row of the dispatch table.
type handler struct {
	name   string
	decode func(*json.Decoder) (Command, error)
	apply  func(*State, Command) (any, *RuleError)
}

// handlers is filled at start-up; adding a command is one struct and one row.
var handlers = map[CommandType]handler{}

func register[C Command](t CommandType, name string, apply func(*State, C) (any, *RuleError)) {
	if _, dup := handlers[t]; dup {
		panic(fmt.Sprintf("fsm: command type %d registered twice", t))
	}
	handlers[t] = handler{
		name: name,
		decode: func(dec *json.Decoder) (Command, error) {
			var c C
			err := dec.Decode(&c)
			return c, err
		},
		apply: func(s *State, c Command) (any, *RuleError) {
			return apply(s, c.(C))
		},
	}
}

func init() {
	register(CmdRegisterMachine, "RegisterMachine", (*State).registerMachine)
	register(CmdSetMachineState, "SetMachineState", (*State).setMachineState)
	register(CmdRemoveMachine, "RemoveMachine", (*State).removeMachine)
	register(CmdAcquireLock, "AcquireLock", (*State).acquireLock)
	register(CmdRenewLock, "RenewLock", (*State).renewLock)
	register(CmdReleaseLock, "ReleaseLock", (*State).releaseLock)
	register(CmdExpireLocks, "ExpireLocks", (*State).expireLocks)
	register(CmdAllocateOverlayIP, "AllocateOverlayIP", (*State).allocateOverlayIP)
	register(CmdPutService, "PutService", (*State).putService)
	register(CmdRemoveService, "RemoveService", (*State).removeService)
	register(CmdSetServiceStatus, "SetServiceStatus", (*State).setServiceStatus)
	register(CmdStartMigration, "StartMigration", (*State).startMigration)
	register(CmdAdvanceMigration, "AdvanceMigration", (*State).advanceMigration)
	register(CmdCommitMigration, "CommitMigration", (*State).commitMigration)
	register(CmdPurgeSource, "PurgeSource", (*State).purgeSource)
	register(CmdStartDrain, "StartDrain", (*State).startDrain)
	register(CmdUpdateDrainItem, "UpdateDrainItem", (*State).updateDrainItem)
	register(CmdEndDrain, "EndDrain", (*State).endDrain)
	register(CmdProbe, "Probe", (*State).probe)
	register(CmdIssueJoinGrant, "IssueJoinGrant", (*State).issueJoinGrant)
	register(CmdSetKeyring, "SetKeyring", (*State).setKeyring)
	register(CmdRemoveVolume, "RemoveVolume", (*State).removeVolume)
	register(CmdAddSecretsKeyWraps, "AddSecretsKeyWraps", (*State).addSecretsKeyWraps)
	register(CmdPutSecret, "PutSecret", (*State).putSecret)
	register(CmdRemoveSecret, "RemoveSecret", (*State).removeSecret)
	register(CmdRenewLease, "RenewLease", (*State).renewLease)
	register(CmdRecordReplica, "RecordReplica", (*State).recordReplica)
	register(CmdFailover, "Failover", (*State).failover)
	register(CmdSettleFailover, "SettleFailover", (*State).settleFailover)
}

// String names the command type.
func (t CommandType) String() string {
	if h, ok := handlers[t]; ok {
		return h.name
	}
	return fmt.Sprintf("CommandType(%d)", uint8(t))
}

// Encode gives a command's wire form: its type byte, then its JSON.
func Encode(c Command) ([]byte, error) {
	if _, ok := handlers[c.Type()]; !ok {
		return nil, fmt.Errorf("encoding %s: %w", c.Type(), ErrUnknownCommand)
	}
	body, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encoding %s: %w", c.Type(), err)
	}
	return append([]byte{byte(c.Type())}, body...), nil
}

// Decode reads a command's wire form. It never panics.
func Decode(b []byte) (Command, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("empty entry: %w", ErrUndecodable)
	}
	t := CommandType(b[0])
	h, ok := handlers[t]
	if !ok {
		return nil, fmt.Errorf("type byte %d: %w", b[0], ErrUnknownCommand)
	}
	dec := json.NewDecoder(bytes.NewReader(b[1:]))
	dec.DisallowUnknownFields()
	c, err := h.decode(dec)
	if err != nil {
		return nil, fmt.Errorf("%s: %v: %w", t, err, ErrUndecodable)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%s: trailing data: %w", t, ErrUndecodable)
	}
	return c, nil
}
