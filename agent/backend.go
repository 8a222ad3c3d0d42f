package agent

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/keyring"
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
	for _, k := range n.GossipKeys() {
		out.GossipKeys = append(out.GossipKeys, keyring.Fingerprint(k))
	}
	st, err := n.Status()
	if err != nil {
		return out, err
	}
	out.Role = st.Role
	out.LeaderID, out.LeaderName, out.LeaderAddr = st.LeaderID, a.nameOf(st.LeaderID), st.LeaderAddr
	out.Term, out.CommitIndex, out.AppliedIndex, out.LastIndex = st.Term, st.CommitIndex, st.AppliedIndex, st.LastIndex
	if st.FollowsServer != "" {
		out.Follows = a.nameOf(st.FollowsServer)
	}
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

// States `machine ls` shows for a machine gossip shows and the facts do
// not hold.
const (
	// machineJoining is a machine the leader has not registered yet.
	machineJoining = "joining"
	// machineRemovedReturning is a machine back under an identity the
	// cluster removed: the leader refuses it, and it follows nothing.
	machineRemovedReturning = "removed"
)

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
	members := n.Members()
	removed := map[string]bool{} // gossiping under a revoked identity
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
		for _, g := range members {
			if _, registered := byID[g.MachineID]; registered {
				continue
			}
			if _, ok := s.RevokedFor(g.MachineID, g.WGPublicKey); ok {
				removed[g.MachineID] = true
			}
		}
	})
	for _, g := range members {
		m, registered := byID[g.MachineID]
		if !registered && g.Liveness != cluster.LivenessAlive {
			continue // departed or removed, not joining
		}
		if !registered {
			// Seen in gossip, not registered: the leader will, unless the
			// cluster removed this identity (it is refused, and shown so).
			state := machineJoining
			if removed[g.MachineID] {
				state = machineRemovedReturning
			}
			m = &ctlapi.Machine{ID: g.MachineID, Name: g.Name, GossipAddr: g.GossipAddr.String(), State: state}
			byID[g.MachineID] = m
			order = append(order, g.MachineID)
		}
		m.Liveness = string(g.Liveness)
		if registered && g.Observer && g.Liveness == cluster.LivenessAlive {
			// Not a server, or made one by the leader and not yet running
			// Raft: either way it follows the facts for now.
			roles[g.MachineID] = cluster.RoleObserver
		}
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

// View says whether the facts this machine shows may be stale.
func (a *Agent) View(context.Context) ctlapi.ViewStatus {
	n := a.currentNode()
	if n == nil {
		return ctlapi.ViewStatus{Stale: true, Reason: "this machine is in no cluster"}
	}
	f := n.Freshness()
	return ctlapi.ViewStatus{Stale: f.Stale, Since: f.Since, Reason: f.Reason}
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
	if err := a.refuseForgotten(); err != nil {
		return false, err
	}
	if a.currentNode() != nil {
		return false, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeAlreadyInCluster, Err: errors.New("this machine is already in a cluster")}
	}
	key, err := newClusterKey()
	if err != nil {
		return false, err
	}
	if err := saveKeys(a.cfg.DataDir, [][]byte{key}); err != nil {
		return false, err
	}
	if err := a.startCluster([][]byte{key}, true, nil); err != nil {
		return false, err
	}
	return true, nil
}

// Join tokens are valid for an hour unless asked otherwise.
const defaultTokenTTL = time.Hour

// JoinToken issues a join grant in the facts and gives the token that
// carries it: another machine joins with it until it expires (once, if
// single-use).
func (a *Agent) JoinToken(ctx context.Context, req ctlapi.JoinTokenRequest) (ctlapi.JoinToken, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.JoinToken{}, err
	}
	ttl := req.TTL
	if ttl == 0 {
		ttl = defaultTokenTTL
	}
	if ttl < 0 || ttl > fsm.MaxGrantLifetime {
		return ctlapi.JoinToken{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadRequest,
			Err: fmt.Errorf("token lifetime %s: want more than 0 and at most %s", ttl, fsm.MaxGrantLifetime)}
	}
	id := make([]byte, 8)
	secret := make([]byte, 32)
	if _, err := rand.Read(id); err != nil {
		return ctlapi.JoinToken{}, err
	}
	if _, err := rand.Read(secret); err != nil {
		return ctlapi.JoinToken{}, err
	}
	now := time.Now()
	g := fsm.JoinGrant{ID: hex.EncodeToString(id), Secret: secret, IssuedBy: a.machineID, ExpiresAt: now.Add(ttl), SingleUse: req.SingleUse}
	if _, err := n.Apply(ctx, fsm.IssueJoinGrant{Grant: g, At: now}); err != nil {
		return ctlapi.JoinToken{}, fmt.Errorf("issuing a join grant: %w", err)
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
	tok, err := makeToken(n.GossipKeys()[0], addrs, g)
	if err != nil {
		return ctlapi.JoinToken{}, err
	}
	a.logger.Info("issued a join token", "id", g.ID, "expires", g.ExpiresAt.UTC().Format(time.RFC3339), "single_use", g.SingleUse)
	return ctlapi.JoinToken{Token: tok, ID: g.ID, ExpiresAt: g.ExpiresAt, SingleUse: g.SingleUse}, nil
}

// Join makes this machine join the cluster named by a token: it proves
// to the leader that it holds the token's grant, bound to its own id and
// WireGuard key, and waits until Raft takes it in. It fails, and keeps
// nothing, when no machine answers or the leader refuses it (the error
// says why).
func (a *Agent) Join(ctx context.Context, req ctlapi.JoinRequest) (ctlapi.ClusterStatus, error) {
	if err := a.refuseForgotten(); err != nil {
		return ctlapi.ClusterStatus{}, err
	}
	if a.currentNode() != nil {
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeAlreadyInCluster, Err: errors.New("this machine is already in a cluster")}
	}
	tok, err := parseToken(req.Token, time.Now())
	if err != nil {
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadToken, Err: err}
	}
	if err := saveKeys(a.cfg.DataDir, [][]byte{tok.key}); err != nil {
		return ctlapi.ClusterStatus{}, err
	}
	forget := func() {
		a.stopCluster(false)
		os.Remove(filepath.Join(a.cfg.DataDir, clusterKeyFile))
	}
	if err := a.startCluster([][]byte{tok.key}, false, nil); err != nil {
		os.Remove(filepath.Join(a.cfg.DataDir, clusterKeyFile))
		return ctlapi.ClusterStatus{}, err
	}
	n := a.currentNode()
	if err := n.SetMeta(func(m *cluster.Meta) {
		proof := cluster.JoinProofFor(tok.grant, tok.secret, a.machineID, m.WGPublicKey)
		m.Join = &proof
	}); err != nil {
		forget()
		return ctlapi.ClusterStatus{}, err
	}
	// Never this machine itself (a machine joining again at the address
	// it had): memberlist counts a join to itself as a success.
	self := netip.AddrPortFrom(a.cfg.BindAddr, uint16(cmp.Or(a.cfg.GossipPort, cluster.DefaultGossipPort))).String()
	addrs := slices.DeleteFunc(slices.Clone(tok.addrs), func(s string) bool { return s == self })
	if len(addrs) == 0 {
		forget()
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadToken,
			Err: fmt.Errorf("%w: it names only this machine (%s) to join", ErrBadToken, self)}
	}
	if _, err := n.Join(addrs); err != nil {
		// Nobody took us in: forget the key so a later join starts clean.
		forget()
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusBadGateway, Code: ctlapi.CodeJoinFailed, Err: err}
	}
	var refused string
	err = a.waitUntil(ctx, func() bool {
		refused = n.JoinRefusal()
		st, err := n.Status()
		return refused != "" || (err == nil && st.Role != cluster.RoleNone)
	})
	if refused != "" {
		forget()
		return ctlapi.ClusterStatus{}, &ctlapi.APIError{Status: http.StatusForbidden, Code: ctlapi.CodeJoinRefused, Err: fmt.Errorf("the cluster refused this machine: %s", refused)}
	}
	if err != nil {
		return ctlapi.ClusterStatus{}, fmt.Errorf("joined gossip but Raft did not take this machine in: %w", err)
	}
	return a.Status(ctx)
}

// joinFromFile joins with the token in file, at start (--join-token-file).
func (a *Agent) joinFromFile(ctx context.Context, file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("--join-token-file: %w", err)
	}
	_, err = a.Join(ctx, ctlapi.JoinRequest{Token: string(b)})
	var refused *ctlapi.APIError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &refused):
		return fmt.Errorf("joining with the token in %s: %w", file, err)
	default:
		// Admitted to gossip, Raft slower than the wait: it goes on.
		a.logger.Warn("still joining the cluster", "err", err)
		return nil
	}
}

// RotateKey replaces the cluster's gossip key on every machine (see
// agent/keyring).
func (a *Agent) RotateKey(ctx context.Context) (ctlapi.KeyRotation, error) {
	n, err := a.requireNode()
	if err != nil {
		return ctlapi.KeyRotation{}, err
	}
	a.logger.Info("rotating the cluster's gossip key")
	r := keyring.Rotator{Facts: n, Gossip: n, Logger: a.logger}
	out, err := r.Rotate(ctx)
	res := ctlapi.KeyRotation{Generation: out.Generation, OldKey: out.OldKey, NewKey: out.NewKey, Confirmed: out.Confirmed, NotAlive: out.NotAlive}
	if errors.Is(err, keyring.ErrNotConfirmed) {
		return res, &ctlapi.APIError{Status: http.StatusGatewayTimeout, Code: ctlapi.CodeRotationStalled, Err: err}
	}
	return res, err
}

// refuseForgotten refuses to init or join after this machine was removed
// from its cluster: its id and key are revoked, a restart makes new ones.
func (a *Agent) refuseForgotten() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.forgotten {
		return &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeRemoved,
			Err: errors.New("this machine was removed from its cluster, which revoked its id and WireGuard key: restart droverd to get new ones, then join")}
	}
	return nil
}

// waitFor polls the Raft status until cond holds, within ctx and 30s.
func (a *Agent) waitFor(ctx context.Context, cond func(cluster.Status) bool) error {
	return a.waitUntil(ctx, func() bool {
		if n := a.currentNode(); n != nil {
			st, err := n.Status()
			return err == nil && cond(st)
		}
		return false
	})
}

// waitUntil polls cond until it holds, within ctx and 30s.
func (a *Agent) waitUntil(ctx context.Context, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// PushImage puts an image of this machine's engine on other machines.
func (a *Agent) PushImage(ctx context.Context, req ctlapi.ImagePushRequest) (ctlapi.ImagePushResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.ImagePushResult{}, err
	}
	return p.images.Push(ctx, req)
}
