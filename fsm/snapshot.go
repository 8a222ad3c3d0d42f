package fsm

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Snapshot format: the magic bytes, a big-endian uint16 format version,
// then records (kind byte, big-endian uint32 length, JSON body), then an
// end record (kind 0, no length). Records are written in a fixed order,
// sorted, so equal states give equal bytes.
const (
	snapshotMagic = "DROVERFS"
	// SnapshotVersion is the snapshot format this package writes.
	SnapshotVersion uint16 = 1
	maxRecordSize          = 16 << 20
)

// recordKind is the first byte of a snapshot record. Append only.
type recordKind byte

const (
	recordEnd        recordKind = 0
	recordMachine    recordKind = 1
	recordLock       recordKind = 2
	recordService    recordKind = 3
	recordVolume     recordKind = 4
	recordMigration  recordKind = 5
	recordDrain      recordKind = 6
	recordJoinGrant  recordKind = 7
	recordRevoked    recordKind = 8
	recordKeyring    recordKind = 9
	recordSecret     recordKind = 10
	recordSecretsKey recordKind = 11
	recordLease      recordKind = 12
)

// ErrBadSnapshot marks a snapshot that cannot be restored.
var ErrBadSnapshot = errors.New("bad fact snapshot")

// WriteSnapshot writes the state in the snapshot format.
func (s *State) WriteSnapshot(w io.Writer) error {
	bw := bufio.NewWriter(w)
	bw.WriteString(snapshotMagic)
	binary.Write(bw, binary.BigEndian, SnapshotVersion)
	for _, m := range s.Machines() {
		if err := writeRecord(bw, recordMachine, m); err != nil {
			return err
		}
	}
	for _, l := range s.Locks() {
		if err := writeRecord(bw, recordLock, l); err != nil {
			return err
		}
	}
	for _, sv := range s.Services() {
		if err := writeRecord(bw, recordService, sv); err != nil {
			return err
		}
	}
	for _, v := range s.Volumes() {
		if err := writeRecord(bw, recordVolume, v); err != nil {
			return err
		}
	}
	for _, m := range s.Migrations() {
		if err := writeRecord(bw, recordMigration, m); err != nil {
			return err
		}
	}
	for _, d := range s.Drains() {
		if err := writeRecord(bw, recordDrain, d); err != nil {
			return err
		}
	}
	for _, g := range s.JoinGrants() {
		if err := writeRecord(bw, recordJoinGrant, g); err != nil {
			return err
		}
	}
	for _, r := range s.RevokedMachines() {
		if err := writeRecord(bw, recordRevoked, r); err != nil {
			return err
		}
	}
	if s.keyring.Generation > 0 {
		if err := writeRecord(bw, recordKeyring, s.keyring); err != nil {
			return err
		}
	}
	for _, sec := range s.Secrets() {
		if err := writeRecord(bw, recordSecret, sec); err != nil {
			return err
		}
	}
	if s.secretsKey.ID != "" {
		if err := writeRecord(bw, recordSecretsKey, s.secretsKey); err != nil {
			return err
		}
	}
	for _, l := range s.Leases() {
		if err := writeRecord(bw, recordLease, l); err != nil {
			return err
		}
	}
	bw.WriteByte(byte(recordEnd))
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("writing snapshot: %w", err)
	}
	return nil
}

func writeRecord(w *bufio.Writer, kind recordKind, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("snapshot record %d: %w", kind, err)
	}
	w.WriteByte(byte(kind))
	binary.Write(w, binary.BigEndian, uint32(len(body)))
	_, err = w.Write(body)
	return err
}

// ReadSnapshot builds a fresh state from a snapshot.
func ReadSnapshot(r io.Reader) (*State, error) {
	br := bufio.NewReader(r)
	head := make([]byte, len(snapshotMagic)+2)
	if _, err := io.ReadFull(br, head); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrBadSnapshot, err)
	}
	if string(head[:len(snapshotMagic)]) != snapshotMagic {
		return nil, fmt.Errorf("%w: not a drover fact snapshot (magic %q)", ErrBadSnapshot, head[:len(snapshotMagic)])
	}
	if v := binary.BigEndian.Uint16(head[len(snapshotMagic):]); v != SnapshotVersion {
		return nil, fmt.Errorf("%w: format version %d, this build reads %d", ErrBadSnapshot, v, SnapshotVersion)
	}
	s := NewState()
	for n := 0; ; n++ {
		kind, err := br.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("%w: record %d: truncated before the end record", ErrBadSnapshot, n)
		}
		if recordKind(kind) == recordEnd {
			return s, nil
		}
		var size uint32
		if err := binary.Read(br, binary.BigEndian, &size); err != nil {
			return nil, fmt.Errorf("%w: record %d: truncated length", ErrBadSnapshot, n)
		}
		if size > maxRecordSize {
			return nil, fmt.Errorf("%w: record %d: %d bytes is too large", ErrBadSnapshot, n, size)
		}
		body := make([]byte, size)
		if _, err := io.ReadFull(br, body); err != nil {
			return nil, fmt.Errorf("%w: record %d: truncated body", ErrBadSnapshot, n)
		}
		if err := s.restoreRecord(recordKind(kind), body); err != nil {
			return nil, fmt.Errorf("%w: record %d: %v", ErrBadSnapshot, n, err)
		}
	}
}

func (s *State) restoreRecord(kind recordKind, body []byte) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	switch kind {
	case recordMachine:
		var m Machine
		if err := dec.Decode(&m); err != nil {
			return fmt.Errorf("machine: %v", err)
		}
		s.machines[m.ID] = m
	case recordLock:
		var l Lock
		if err := dec.Decode(&l); err != nil {
			return fmt.Errorf("lock: %v", err)
		}
		s.locks[l.Namespace] = l
	case recordService:
		var sv Service
		if err := dec.Decode(&sv); err != nil {
			return fmt.Errorf("service: %v", err)
		}
		s.services[sv.Key()] = sv
	case recordVolume:
		var v Volume
		if err := dec.Decode(&v); err != nil {
			return fmt.Errorf("volume: %v", err)
		}
		s.volumes[v.Key()] = v
	case recordMigration:
		var m Migration
		if err := dec.Decode(&m); err != nil {
			return fmt.Errorf("migration: %v", err)
		}
		s.migrations[m.ID] = m
	case recordDrain:
		var d Drain
		if err := dec.Decode(&d); err != nil {
			return fmt.Errorf("drain: %v", err)
		}
		s.drains[d.MachineID] = d
	case recordJoinGrant:
		var g JoinGrant
		if err := dec.Decode(&g); err != nil {
			return fmt.Errorf("join grant: %v", err)
		}
		s.grants[g.ID] = g
	case recordRevoked:
		var r Revoked
		if err := dec.Decode(&r); err != nil {
			return fmt.Errorf("revoked machine: %v", err)
		}
		s.revoked[r.MachineID] = r
	case recordKeyring:
		if err := dec.Decode(&s.keyring); err != nil {
			return fmt.Errorf("keyring: %v", err)
		}
	case recordSecret:
		var sec Secret
		if err := dec.Decode(&sec); err != nil {
			return fmt.Errorf("secret: %v", err)
		}
		s.secrets[sec.Key()] = sec
	case recordLease:
		var l Lease
		if err := dec.Decode(&l); err != nil {
			return fmt.Errorf("lease: %v", err)
		}
		s.leases[l.MachineID] = l
	case recordSecretsKey:
		if err := dec.Decode(&s.secretsKey); err != nil {
			return fmt.Errorf("secrets key: %v", err)
		}
	default:
		return fmt.Errorf("unknown record kind %d", kind)
	}
	return nil
}
