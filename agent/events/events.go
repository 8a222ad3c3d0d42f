// Package events keeps the changes of the facts as this machine applies
// them — deploys, migrations and their phases, drains, machines joining,
// leaving and changing state, services becoming ready or failing — for
// `droverctl events [-f]`. Every machine applies the same log, so every
// machine tells the same story. See DESIGN.md.
package events

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

// keep is how many events a machine keeps.
const keep = 1000

// Log is the events this machine kept, and their followers.
type Log struct {
	mu      sync.Mutex
	ring    []ctlapi.Event
	changed chan struct{} // closed and replaced on every event
}

// New makes an empty log.
func New() *Log { return &Log{changed: make(chan struct{})} }

// Applied is the fact store's hook (cluster.Config.OnChange): it keeps an
// event for each command worth telling. It runs under the store's lock:
// it only describes and appends.
func (l *Log) Applied(index uint64, c fsm.Command, s *fsm.State) {
	ev, ok := Describe(c, s)
	if !ok {
		return
	}
	ev.Index = index
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.ring) == keep {
		l.ring = append(l.ring[:0], l.ring[1:]...)
	}
	l.ring = append(l.ring, ev)
	close(l.changed)
	l.changed = make(chan struct{})
}

// Follow passes the kept events to emit, oldest first, then with follow
// each new one as it comes, until ctx ends.
func (l *Log) Follow(ctx context.Context, follow bool, emit func(ctlapi.Event)) error {
	var after uint64
	for {
		l.mu.Lock()
		var todo []ctlapi.Event
		for _, ev := range l.ring {
			if ev.Index > after {
				todo = append(todo, ev)
			}
		}
		changed := l.changed
		l.mu.Unlock()
		for _, ev := range todo {
			emit(ev)
			after = ev.Index
		}
		if !follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// Describe tells what a command that changed the facts did, in the
// facts' names; ok is false for commands not worth an event (lock
// renewals, probes, address allocations).
func Describe(c fsm.Command, s *fsm.State) (ev ctlapi.Event, ok bool) {
	name := s.NameOf
	mk := func(at time.Time, kind, subject, format string, args ...any) (ctlapi.Event, bool) {
		return ctlapi.Event{Time: at, Kind: kind, Subject: subject, Message: fmt.Sprintf(format, args...)}, true
	}
	switch c := c.(type) {
	case fsm.RegisterMachine:
		return mk(c.At, "machine", c.Machine.Name, "registered (%s)", c.Machine.State)
	case fsm.SetMachineState:
		return mk(c.At, "machine", name(c.ID), "now %s", c.State)
	case fsm.RemoveMachine:
		return mk(c.At, "machine", c.ID, "removed from the cluster; its id and key revoked")
	case fsm.PutService:
		sv, _ := s.Service(c.Namespace, c.Spec.Name)
		return mk(c.At, "deploy", c.Namespace+"/"+c.Spec.Name, "generation %d on %s (%s)", sv.Generation, name(sv.MachineID), c.Spec.RunImage())
	case fsm.RemoveService:
		return mk(c.At, "deploy", c.Namespace+"/"+c.Name, "removed")
	case fsm.SetServiceStatus:
		if c.Ready {
			return mk(c.At, "service", c.Namespace+"/"+c.Name, "ready on %s (generation %d)", name(c.MachineID), c.Generation)
		}
		return mk(c.At, "service", c.Namespace+"/"+c.Name, "failed on %s (generation %d): %s", name(c.MachineID), c.Generation, c.Error)
	case fsm.StartMigration:
		return mk(c.At, "migration", c.Namespace+"/"+c.Service, "migration %s to %s started", c.ID, name(c.TargetID))
	case fsm.AdvanceMigration:
		m, _ := s.Migration(c.ID)
		msg := fmt.Sprintf("migration %s: %s", c.ID, c.Phase)
		if c.Error != "" {
			msg += ": " + c.Error
		}
		return mk(c.At, "migration", m.Namespace+"/"+m.Service, "%s", msg)
	case fsm.CommitMigration:
		m, _ := s.Migration(c.ID)
		return mk(c.At, "migration", m.Namespace+"/"+m.Service, "migration %s committed: %s owns it", c.ID, name(m.TargetID))
	case fsm.StartDrain:
		return mk(c.At, "drain", name(c.Drain.MachineID), "drain started (%d services)", len(c.Drain.Items))
	case fsm.UpdateDrainItem:
		return mk(c.At, "drain", name(c.MachineID), "%s: %s", c.Item.Service, c.Item.State)
	case fsm.EndDrain:
		msg := "drain " + string(c.State)
		if c.Note != "" {
			msg += ": " + c.Note
		}
		return mk(c.At, "drain", name(c.MachineID), "%s", msg)
	case fsm.IssueJoinGrant:
		return mk(c.At, "cluster", "join grant", "issued")
	case fsm.SetKeyring:
		return mk(c.At, "cluster", "gossip key", "keyring changed (%d keys)", len(c.Keys))
	}
	return ctlapi.Event{}, false
}
