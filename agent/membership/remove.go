// Package membership removes machines from the cluster: the asking
// side (checks, telling a live machine to leave, its Raft seat, its
// facts) and the removed machine's side (leave and forget the cluster).
package membership

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
)

// routeLeave tells the machine being removed to leave for good.
var routeLeave = peer.Route[leaveRequest, struct{}]{Path: "machine/v2/leave"}

// leaveRequest is the request of routeLeave.
type leaveRequest struct{}

// errLeaveRefused: a leave asked by a machine that is not in the facts.
var errLeaveRefused = peer.NewError("leave_refused", "only a member of the cluster may tell this machine to leave")

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
}

// Cluster is what removal needs of the node: gossip's view of a machine,
// and its Raft seat.
type Cluster interface {
	Member(id string) (cluster.Member, bool)
	RemoveServer(ctx context.Context, id string) error
}

// Remover removes machines, and leaves when this machine is removed.
type Remover struct {
	self   string
	facts  Facts
	node   Cluster
	peers  peer.Caller
	logger *slog.Logger
	// forget makes this machine leave the cluster for good; from is the
	// machine that asked. It must return at once: the answer goes out
	// before the leaving.
	forget func(from string)
}

// New makes a remover for machine self.
func New(self string, facts Facts, node Cluster, peers peer.Caller, logger *slog.Logger, forget func(from string)) *Remover {
	return &Remover{self: self, facts: facts, node: node, peers: peers, logger: logger, forget: forget}
}

// Register serves the removed machine's side on s.
func (a *Remover) Register(s peer.Server) {
	peer.Handle(s, routeLeave, a.handleLeave)
}

// RemoveMachine removes a drained or dead machine from the cluster: the
// machine, when alive, leaves and forgets the cluster; then its Raft seat
// and its facts go. A machine that still holds services or volumes is
// refused unless req.Force, which forgets them (their data is lost).
func (a *Remover) RemoveMachine(ctx context.Context, req ctlapi.RemoveMachineRequest) (ctlapi.RemovedMachine, error) {
	m, err := factview.MachineByName(a.facts, a.self, req.Machine)
	if err != nil {
		return ctlapi.RemovedMachine{}, err
	}
	out := ctlapi.RemovedMachine{Machine: m.Name, ID: m.ID}
	refuse := func(code string, format string, args ...any) (ctlapi.RemovedMachine, error) {
		return out, &ctlapi.APIError{Status: http.StatusConflict, Code: code, Err: fmt.Errorf(format, args...)}
	}
	if m.ID == a.self {
		return refuse(ctlapi.CodeSelf, "machine %s cannot remove itself: run `droverctl machine rm %s` on another machine", m.Name, m.Name)
	}
	g, known := a.node.Member(m.ID)
	alive := known && (g.Liveness == cluster.LivenessAlive || g.Liveness == cluster.LivenessSuspect)
	if alive && m.State != fsm.MachineDrained {
		return refuse(ctlapi.CodeNotDrained, "machine %s is %s and alive: drain it first (`droverctl machine drain %s`), or stop its daemon", m.Name, m.State, m.Name)
	}
	var held []string
	a.facts.Read(func(s *fsm.State) {
		for _, sv := range s.Services() {
			if sv.MachineID == m.ID {
				held = append(held, "service "+sv.Key()+" (stops running)")
			}
		}
		for _, v := range s.Volumes() {
			if v.OwnerID == m.ID {
				held = append(held, "volume "+v.Key()+" (its only copy is on "+m.Name+")")
			}
		}
	})
	if len(held) > 0 && !req.Force {
		return refuse(ctlapi.CodeMachineHolds, "machine %s still holds %s; removing it loses them: drain it, or pass --force to remove it anyway", m.Name, strings.Join(held, ", "))
	}
	if alive {
		if err := a.tellToLeave(ctx, m); err != nil {
			return out, err
		}
		out.Left = true
	}
	if err := a.node.RemoveServer(ctx, m.ID); err != nil {
		return out, err
	}
	raw, err := a.facts.Apply(ctx, fsm.RemoveMachine{ID: m.ID, Force: req.Force, At: time.Now()})
	if err != nil {
		return out, fmt.Errorf("removing machine %s from the facts: %w", m.Name, err)
	}
	var lost []string
	if err := json.Unmarshal(raw, &lost); err != nil {
		return out, fmt.Errorf("removing machine %s: reading the result: %w", m.Name, err)
	}
	if len(lost) > 0 {
		out.Lost = held
	}
	a.logger.Warn("machine removed from the cluster", "machine", m.Name, "left", out.Left, "lost", out.Lost)
	return out, nil
}

// tellToLeave asks a live machine to leave the cluster for good and waits
// until gossip sees it gone.
func (a *Remover) tellToLeave(ctx context.Context, m fsm.Machine) error {
	// Leaving is idempotent: a call that failed on the way (a pooled
	// connection to a daemon that restarted since is reset) is made once
	// more; an answer from the machine is final.
	var err error
	for try := 0; try < 2; try++ {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = routeLeave.Call(cctx, a.peers, m.ID, leaveRequest{})
		cancel()
		var remote *peer.RemoteError
		if err == nil || errors.As(err, &remote) || ctx.Err() != nil {
			break
		}
		a.logger.Warn("asking a machine to leave; trying again", "machine", m.Name, "err", err)
	}
	if err != nil {
		return fmt.Errorf("asking %s to leave the cluster: %w", m.Name, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if g, ok := a.node.Member(m.ID); !ok || (g.Liveness != cluster.LivenessAlive && g.Liveness != cluster.LivenessSuspect) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("machine %s was asked to leave but gossip still sees it alive after 30s", m.Name)
}

// handleLeave is the removed machine's side: answer, then leave the
// cluster and forget it (key, Raft state, known peers, overlay address),
// so that a restart does not bring it back. Its daemon goes on, in no
// cluster; workloads are not touched (a drained machine runs none). Only
// a member may ask.
func (a *Remover) handleLeave(_ context.Context, from string, _ leaveRequest) (struct{}, error) {
	if from == "" {
		return struct{}{}, errLeaveRefused
	}
	a.forget(from)
	return struct{}{}, nil
}
