package cluster

import (
	"time"

	"github.com/drover-sh/drover/fsm"
)

// admission decides whether the leader registers a machine gossip shows
// and the facts do not hold yet: only with a usable join grant whose
// secret it proved it holds, and never a removed machine. It returns the
// grant to register it with, or why it is refused.
func admission(s *fsm.State, m Meta, now time.Time) (grant, refused string) {
	if r, ok := s.RevokedFor(m.MachineID, m.WGPublicKey); ok {
		return "", "machine " + r.Name + " (" + r.MachineID + ") was removed from the cluster at " +
			r.At.UTC().Format(time.RFC3339) + ": its id and WireGuard key are not admitted again; start it with a new data dir and join with a new token"
	}
	if m.Join == nil {
		return "", "it presented no join token: run `droverctl cluster join-token` on a member, then `droverctl cluster join --token-file FILE` here"
	}
	if err := s.GrantUsable(m.Join.Grant, m.MachineID, now); err != nil {
		return "", err.Message
	}
	g, _ := s.JoinGrant(m.Join.Grant)
	if !verifyJoinProof(*m.Join, g.Secret, m) {
		return "", "its proof of join token " + g.ID + " does not match its machine id and WireGuard key"
	}
	return g.ID, ""
}

// refuse logs once why machine m is not admitted, and tells it on every
// round, so that a `cluster join` waiting there can say why.
func (n *Node) refuse(m Member, reason string) {
	n.impostorsMu.Lock()
	if n.refused == nil {
		n.refused = map[string]string{}
	}
	first := n.refused[m.MachineID] != reason
	n.refused[m.MachineID] = reason
	n.impostorsMu.Unlock()
	if first {
		n.logger.Warn("refused to admit a machine", "machine", m.Name, "id", m.MachineID, "from", m.GossipAddr.String(), "reason", reason)
	}
	msg := userMsg{Refused: reason}
	if m.Join != nil {
		msg.Grant = m.Join.Grant
	}
	if err := n.gossip.tell(m.MachineID, msg); err != nil {
		n.logger.Debug("could not tell a refused machine why", "machine", m.Name, "err", err)
	}
}

// JoinRefusal is why the cluster's leader refused to admit this machine,
// as it told it over gossip; empty if it did not.
func (n *Node) JoinRefusal() string { return n.gossip.lastRefusal() }

// GossipKeys are the gossip keys this machine has installed, its primary
// first.
func (n *Node) GossipKeys() [][]byte { return n.gossip.keys() }

// InstallKeyring makes this machine's gossip keyring exactly keys
// (keys[0] encrypts) and gossips that it holds generation gen of the
// fact store's keyring.
func (n *Node) InstallKeyring(keys [][]byte, gen uint64) error {
	if len(keys) == 0 {
		return nil
	}
	if err := n.gossip.setKeys(keys); err != nil {
		return err
	}
	return n.gossip.setMeta(func(m *Meta) { m.KeyGen = gen })
}
