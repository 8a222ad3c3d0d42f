// Package factview holds the few reads of the facts that every part of
// the agent makes alike: a machine by the name an operator typed, the
// name of a machine id, a service's namespace/name, and waiting until
// this machine's facts have caught up with the leader's.
package factview

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// Reader reads the facts.
type Reader interface {
	Read(func(*fsm.State))
}

// Gossip names machines as gossip knows them.
type Gossip interface {
	Member(id string) (cluster.Member, bool)
}

// MachineByName finds a machine's fact by name; "self" is this machine.
func MachineByName(f Reader, self, name string) (fsm.Machine, error) {
	var m fsm.Machine
	var ok bool
	f.Read(func(s *fsm.State) {
		if name == "self" {
			m, ok = s.Machine(self)
		} else {
			m, ok = s.MachineByName(name)
		}
	})
	if !ok {
		return m, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownMachine, Err: fmt.Errorf("no machine named %q in the cluster", name)}
	}
	return m, nil
}

// NameOf gives a machine's name from its id: gossip's, else the facts',
// else the id.
func NameOf(g Gossip, f Reader, id string) string {
	if id == "" {
		return id
	}
	if m, ok := g.Member(id); ok {
		return m.Name
	}
	name := id
	f.Read(func(s *fsm.State) { name = s.NameOf(id) })
	return name
}

// SplitService splits "namespace/name", or says what is wrong with it.
func SplitService(s string) (ns, name string, err error) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return "", "", &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadRequest, Err: fmt.Errorf("service %q: want namespace/name", s)}
	}
	return ns, name, nil
}

// Catcher tells whether this machine's facts have caught up.
type Catcher interface {
	CaughtUp(ctx context.Context) error
}

// WaitCaughtUp returns once this machine's facts have caught up with the
// leader, trying again at every tick, or false when ctx ends. Whatever
// acts on facts after a start waits for it: a store still empty after a
// restart would look like "this machine owns nothing".
func WaitCaughtUp(ctx context.Context, f Catcher, tick <-chan time.Time, logger *slog.Logger, who string) bool {
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := f.CaughtUp(cctx)
		cancel()
		if err == nil {
			return true
		}
		logger.Debug("waiting for the fact store to catch up", "for", who, "err", err)
		select {
		case <-ctx.Done():
			return false
		case <-tick:
		}
	}
}

// FactsAt tells whether every machine the facts register (gone ones
// aside) gossips a facts level (cluster.FactsLevel) of at least level, so
// that a command may carry the fields of that level; when not, it names a
// machine that does not, or that gossip does not see.
func FactsAt(f Reader, g Gossip, level uint32) (bool, string) {
	var machines []fsm.Machine
	f.Read(func(s *fsm.State) { machines = s.Machines() })
	for _, m := range machines {
		if m.State == fsm.MachineGone {
			continue
		}
		if mb, ok := g.Member(m.ID); !ok || mb.Facts < level {
			return false, m.Name
		}
	}
	return true, ""
}
