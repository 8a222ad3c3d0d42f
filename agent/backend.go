package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/netmesh"
)

// errNotInCluster is what every cluster-wide request gets before init/join.
var errNotInCluster = &ctlapi.APIError{
	Status: http.StatusConflict,
	Code:   ctlapi.CodeNotInCluster,
	Err:    errors.New("this machine is in no cluster yet: run `droverctl cluster init` or `droverctl cluster join --token-file FILE`"),
}

func (a *Agent) requireNode() (*cluster.Node, error) {
	p, err := a.require()
	if err != nil {
		return nil, err
	}
	return p.node, nil
}

// require gives the parts of this machine's cluster membership, or the
// error every cluster-wide request gets before init/join.
func (a *Agent) require() (*parts, error) {
	if p := a.current(); p != nil {
		return p, nil
	}
	return nil, errNotInCluster
}

// nameOf gives a machine's name from its id, or the id when unknown.
func (a *Agent) nameOf(id string) string {
	n := a.currentNode()
	if n == nil {
		return id
	}
	return factview.NameOf(n, n, id)
}

// Version reports the daemon's version.
func (a *Agent) Version(context.Context) ctlapi.VersionInfo {
	return ctlapi.VersionInfo{Version: a.cfg.Version, APIVersion: ctlapi.APIVersion}
}

// Status reports this machine's view of the cluster.
func (a *Agent) Status(context.Context) (ctlapi.ClusterStatus, error) {
	out := ctlapi.ClusterStatus{MachineID: a.machineID, MachineName: a.cfg.Name, Role: cluster.RoleNone}
	n := a.currentNode()
	if n == nil {
		return out, nil
	}
	out.Initialized = true
	st, err := n.Status()
	if err != nil {
		return out, err
	}
	out.Role = st.Role
	out.LeaderID, out.LeaderName, out.LeaderAddr = st.LeaderID, a.nameOf(st.LeaderID), st.LeaderAddr
	out.Term, out.CommitIndex, out.AppliedIndex, out.LastIndex = st.Term, st.CommitIndex, st.AppliedIndex, st.LastIndex
	for _, s := range st.Servers {
		rs := ctlapi.RaftServer{ID: s.ID, Name: a.nameOf(s.ID), Address: s.Address, Leader: s.Leader, Suffrage: "nonvoter"}
		if s.Voter {
			rs.Suffrage = "voter"
			out.Voters = append(out.Voters, rs)
		} else {
			out.NonVoters = append(out.NonVoters, rs)
		}
	}
	return out, nil
}

// Machines lists every machine: registered in the facts or seen in gossip.
func (a *Agent) Machines(context.Context) ([]ctlapi.Machine, error) {
	p, err := a.require()
	if err != nil {
		return nil, err
	}
	n := p.node
	st, err := n.Status()
	if err != nil && !errors.Is(err, cluster.ErrRaftNotStarted) {
		return nil, err
	}
	roles := map[string]string{}
	for _, s := range st.Servers {
		switch {
		case s.Leader:
			roles[s.ID] = "leader"
		case s.Voter:
			roles[s.ID] = "voter"
		default:
			roles[s.ID] = "nonvoter"
		}
	}
	byID := map[string]*ctlapi.Machine{}
	var order []string
	var drains []fsm.Drain
	n.Read(func(s *fsm.State) {
		drains = s.Drains()
		for _, m := range s.Machines() {
			out := &ctlapi.Machine{
				ID: m.ID, Name: m.Name, GossipAddr: m.GossipAddr, State: string(m.State),
				WGPublicKey: m.WGPublicKey, Liveness: string(cluster.LivenessUnknown),
			}
			if m.OverlayIP.IsValid() {
				out.OverlayIP = m.OverlayIP.String()
			}
			byID[m.ID] = out
			order = append(order, m.ID)
		}
	})
	for _, g := range n.Members() {
		m, ok := byID[g.MachineID]
		if !ok && g.Liveness != cluster.LivenessAlive {
			continue // departed or removed, not joining
		}
		if !ok {
			// Seen in gossip, not registered yet: the leader will.
			m = &ctlapi.Machine{ID: g.MachineID, Name: g.Name, GossipAddr: g.GossipAddr.String(), State: "joining"}
			byID[g.MachineID] = m
			order = append(order, g.MachineID)
		}
		m.Liveness = string(g.Liveness)
		if !g.LastContact.IsZero() {
			lc := g.LastContact
			m.LastContact = &lc
		}
	}
	for _, d := range drains {
		if m, ok := byID[d.MachineID]; ok {
			info := p.drains.Info(d)
			m.Drain = &info
		}
	}
	handshakes := map[string]time.Time{}
	if ms, err := a.meshStatus(); err == nil {
		for _, p := range ms.Peers {
			handshakes[p.PublicKey] = p.LastHandshake
		}
	}
	out := make([]ctlapi.Machine, 0, len(order))
	for _, id := range order {
		m := byID[id]
		m.RaftRole = roles[id]
		if m.RaftRole == "" {
			m.RaftRole = "none"
		}
		if hs, ok := handshakes[m.WGPublicKey]; ok && !hs.IsZero() {
			m.LastHandshake = &hs
		}
		out = append(out, *m)
	}
	return out, nil
}

// Mesh reports this machine's WireGuard device and its peers.
func (a *Agent) Mesh(ctx context.Context) (ctlapi.MeshStatus, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MeshStatus{}, err
	}
	st, err := p.mesh.Status()
	if err != nil {
		return ctlapi.MeshStatus{}, err
	}
	names := map[string]string{}
	if n := a.currentNode(); n != nil {
		for _, m := range n.Members() {
			names[m.WGPublicKey] = m.Name
		}
	}
	out := ctlapi.MeshStatus{Interface: st.Name, Kind: st.Kind, PublicKey: st.PublicKey, ListenPort: st.ListenPort}
	if o := p.mesh.Overlay(); o.IsValid() {
		out.Address = netip.PrefixFrom(o, a.cfg.OverlayPrefix.Bits()).String()
	}
	for _, p := range st.Peers {
		mp := ctlapi.MeshPeer{Machine: names[p.PublicKey], PublicKey: p.PublicKey, Endpoint: p.Endpoint,
			AllowedIPs: p.AllowedIPs, RxBytes: p.RxBytes, TxBytes: p.TxBytes}
		if !p.LastHandshake.IsZero() {
			hs := p.LastHandshake
			mp.LastHandshake = &hs
		}
		out.Peers = append(out.Peers, mp)
	}
	return out, nil
}

// meshStatus reads the device.
func (a *Agent) meshStatus() (netmesh.Status, error) {
	p, err := a.require()
	if err != nil {
		return netmesh.Status{}, err
	}
	return p.mesh.Status()
}

// Activate marks a machine active: it takes placements again.
func (a *Agent) Activate(ctx context.Context, name string) (ctlapi.Machine, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.Machine{}, err
	}
	m, err := factview.MachineByName(n, a.machineID, name)
	if err != nil {
		return ctlapi.Machine{}, err
	}
	raw, err := n.Apply(ctx, fsm.SetMachineState{ID: m.ID, State: fsm.MachineActive, At: time.Now()})
	if err != nil {
		return ctlapi.Machine{}, fmt.Errorf("activating %s: %w", name, err)
	}
	var got fsm.Machine
	if err := json.Unmarshal(raw, &got); err != nil {
		return ctlapi.Machine{}, fmt.Errorf("activating %s: reading the result: %w", name, err)
	}
	return ctlapi.Machine{ID: got.ID, Name: got.Name, GossipAddr: got.GossipAddr, State: string(got.State)}, nil
}

// Init makes this machine the first of a new cluster.
func (a *Agent) Init(ctx context.Context) (ctlapi.ClusterStatus, error) {
	if _, err := a.initCluster(); err != nil {
		return ctlapi.ClusterStatus{}, err
	}
	if err := a.waitFor(ctx, func(st cluster.Status) bool { return st.Role == cluster.RoleLeader }); err != nil {
		return ctlapi.ClusterStatus{}, fmt.Errorf("waiting to lead the new cluster: %w", err)
	}
	return a.Status(ctx)
}

func (a *Agent) initCluster() (bool, error) {
	if a.currentNode() != nil {
		return false, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeAlreadyInCluster, Err: errors.New("this machine is already in a cluster")}
	}
	key, err := newClusterKey()
	if err != nil {
		return false, err
	}
	if err := saveKey(a.cfg.DataDir, key); err != nil {
		return false, err
	}
	if err := a.startCluster(key, true, nil); err != nil {
		return false, err
	}
	return true, nil
}

// JoinToken gives a token with which another machine joins this cluster.
func (a *Agent) JoinToken(context.Context) (ctlapi.JoinToken, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.JoinToken{}, err
	}
	key, err := a.configuredKey()
	if err != nil {
		return ctlapi.JoinToken{}, err
	}
	addrs := []string{}
	self, _ := n.Member(a.machineID)
	if self.GossipAddr.IsValid() {
		addrs = append(addrs, self.GossipAddr.String())
	}
	for _, m := range n.Members() {
		if m.MachineID != a.machineID && m.Liveness == cluster.LivenessAlive {
			addrs = append(addrs, m.GossipAddr.String())
		}
	}
	tok, err := makeToken(key, addrs)
	if err != nil {
		return ctlapi.JoinToken{}, err
	}
	return ctlapi.JoinToken{Token: tok}, nil
}

// Join makes this machine join the cluster named by a token. It fails,
// and keeps nothing, when no machine of the cluster accepts it.
func (a *Agent) Join(ctx context.Context, req ctlapi.JoinRequest) (ctlapi.ClusterStatus, error) {
	if a.currentNode() != nil {
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeAlreadyInCluster, Err: errors.New("this machine is already in a cluster")}
	}
	key, addrs, err := parseToken(req.Token)
	if err != nil {
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadToken, Err: err}
	}
	if err := saveKey(a.cfg.DataDir, key); err != nil {
		return ctlapi.ClusterStatus{}, err
	}
	if err := a.startCluster(key, false, nil); err != nil {
		os.Remove(filepath.Join(a.cfg.DataDir, clusterKeyFile))
		return ctlapi.ClusterStatus{}, err
	}
	if _, err := a.currentNode().Join(addrs); err != nil {
		// Nobody took us in: forget the key so a later join starts clean.
		a.stopCluster(false)
		os.Remove(filepath.Join(a.cfg.DataDir, clusterKeyFile))
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusBadGateway, Code: ctlapi.CodeJoinFailed, Err: err}
	}
	if err := a.waitFor(ctx, func(st cluster.Status) bool { return st.Role != cluster.RoleNone }); err != nil {
		return ctlapi.ClusterStatus{}, fmt.Errorf("joined gossip but Raft did not take this machine in: %w", err)
	}
	return a.Status(ctx)
}

// waitFor polls the Raft status until cond holds, within ctx and 30s.
func (a *Agent) waitFor(ctx context.Context, cond func(cluster.Status) bool) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if n := a.currentNode(); n != nil {
			if st, err := n.Status(); err == nil && cond(st) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
