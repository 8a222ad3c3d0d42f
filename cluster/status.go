package cluster

import (
	"fmt"
	"slices"
	"sort"

	"github.com/hashicorp/raft"
)

// Raft roles as shown to operators.
const (
	RoleLeader    = "leader"
	RoleFollower  = "follower"
	RoleCandidate = "candidate"
	RoleNonvoter  = "nonvoter"
	RoleNone      = "none" // not (yet) in the Raft configuration
	// RoleObserver is a machine that follows the facts from a Raft server
	// and takes no part in Raft (follow.go).
	RoleObserver = "observer"
)

// Server is one entry of the Raft configuration.
type Server struct {
	ID      string
	Address string
	Voter   bool
	Leader  bool
}

// Status is this machine's view of Raft.
type Status struct {
	MachineID    string
	Role         string
	LeaderID     string
	LeaderAddr   string
	Term         uint64
	CommitIndex  uint64
	AppliedIndex uint64
	LastIndex    uint64
	Servers      []Server // sorted by ID
	// FollowsServer is the server an observer follows the facts from.
	FollowsServer string
}

// Status reads the local Raft state and configuration.
func (n *Node) Status() (Status, error) {
	st := Status{MachineID: n.cfg.MachineID, Role: RoleNone}
	if n.observing() {
		st.AppliedIndex = n.FactsIndex()
		if f := n.following.Load(); f != nil {
			st.Role = RoleObserver // once it has heard from a server
			st.LeaderID, st.LeaderAddr, st.Term, st.CommitIndex = f.status.LeaderID, f.status.LeaderAddr, f.status.Term, f.status.CommitIdx
			st.Servers = slices.Clone(f.status.Servers)
			st.FollowsServer = f.status.ServerID
		}
		return st, nil
	}
	p, err := n.parts()
	if err != nil {
		return st, err
	}
	r := p.raft
	addr, id := r.LeaderWithID()
	st.LeaderID, st.LeaderAddr = string(id), string(addr)
	st.Term = r.CurrentTerm()
	st.CommitIndex = r.CommitIndex()
	st.AppliedIndex = r.AppliedIndex()
	st.LastIndex = r.LastIndex()
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return st, fmt.Errorf("reading raft configuration: %w", err)
	}
	var self *raft.Server
	for _, s := range f.Configuration().Servers {
		s := s
		if string(s.ID) == n.cfg.MachineID {
			self = &s
		}
		st.Servers = append(st.Servers, Server{
			ID: string(s.ID), Address: string(s.Address),
			Voter: s.Suffrage == raft.Voter, Leader: s.ID == id,
		})
	}
	sort.Slice(st.Servers, func(i, j int) bool { return st.Servers[i].ID < st.Servers[j].ID })
	switch {
	case self == nil:
		st.Role = RoleNone
	case r.State() == raft.Leader:
		st.Role = RoleLeader
	case self.Suffrage != raft.Voter:
		st.Role = RoleNonvoter
	case r.State() == raft.Candidate:
		st.Role = RoleCandidate
	default:
		st.Role = RoleFollower
	}
	return st, nil
}

// IsLeader tells whether this machine leads Raft now.
func (n *Node) IsLeader() bool { return n.leading() }
