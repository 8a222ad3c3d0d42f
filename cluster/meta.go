package cluster

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
)

// metaVersion is the first byte of every gossip metadata blob. A new
// layout gets a new number; a daemon reads every version it knows.
const metaVersion byte = 1

// maxMetaSize is memberlist's limit on node metadata.
const maxMetaSize = 512

// Meta is what a machine tells every other machine about itself over
// gossip, before and independently of Raft: enough to reach it and to
// build the mesh.
type Meta struct {
	MachineID   string `json:"id"`
	Name        string `json:"name"`
	RaftAddr    string `json:"raft,omitempty"`
	RPCAddr     string `json:"rpc,omitempty"`
	WGPublicKey string `json:"wgkey,omitempty"`
	WGEndpoint  string `json:"wgep,omitempty"`
	OverlayIP   string `json:"overlay,omitempty"`
	MemoryBytes uint64 `json:"mem,omitempty"`
	DiskBytes   uint64 `json:"disk,omitempty"`
	// MilliCPUs is the machine's cores, in thousandths.
	MilliCPUs uint64 `json:"mcpu,omitempty"`
	// Join proves, until this machine is registered, that it holds a
	// join grant's secret (see JoinProofFor).
	Join *JoinProof `json:"join,omitempty"`
	// KeyGen is the generation of the fact store's gossip keyring this
	// machine has installed (0: none yet).
	KeyGen uint64 `json:"kg,omitempty"`
	// Leaving is gossiped just before a clean departure, so the others
	// record "left" rather than "failed" (memberlist's leave event does
	// not say which).
	Leaving bool `json:"leaving,omitempty"`
	// Facts is the newest form of the facts this daemon decodes
	// (FactsLevel); absent (0) on daemons older than levels.
	Facts uint32 `json:"facts,omitempty"`
	// Observer: this machine follows the facts from a Raft server and
	// runs no Raft (absent on servers, and on daemons older than
	// observers, which all run Raft).
	Observer bool `json:"obs,omitempty"`
}

// FactsLevel is the form of the facts this daemon decodes. The fact
// store refuses entries with fields it does not know (it halts: skipping
// one would diverge), so a field a newer daemon adds is written only
// once every machine gossips a level that knows it.
//
//	1: everything before the cutover of issue 16 (gossiped as absent)
//	2: Migration.Cutover (a move's breakdown), VolumeMount.RecordSize
//	   and .Compression, ServiceSpec.Flush, .Entrypoint, .User,
//	   .WorkingDir, .Labels, .ReadOnly, .Tmpfs
//	3: ServiceSpec.Restart, .RestartMax, .Health, .MilliCPUs, .Secrets;
//	   ServiceStatus.Process; the secrets commands and records
//	4: ServiceSpec.Standby, Service.StandbyID, .Replica, .LastFailover;
//	   leases; commands 26-29
const FactsLevel uint32 = FactsLevelStandby

// FactsLevelCutover is the level that brought the fields of issue 16 (and
// RemoveVolume): what a proposer of those checks for.
const FactsLevelCutover uint32 = 2

// FactsLevelOperator is the level of issue 17's fields and commands.
const FactsLevelOperator uint32 = 3

// FactsLevelStandby is the level of issue 18's standby replicas.
const FactsLevelStandby uint32 = 4

// ErrBadMeta marks gossip metadata that cannot be read.
var ErrBadMeta = errors.New("bad gossip metadata")

func encodeMeta(m Meta) ([]byte, error) {
	body, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encoding gossip metadata: %w", err)
	}
	out := append([]byte{metaVersion}, body...)
	if len(out) > maxMetaSize {
		return nil, fmt.Errorf("gossip metadata is %d bytes, the limit is %d: %w", len(out), maxMetaSize, ErrBadMeta)
	}
	return out, nil
}

func decodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) == 0 {
		return m, fmt.Errorf("empty: %w", ErrBadMeta)
	}
	if b[0] != metaVersion {
		return m, fmt.Errorf("version %d, this daemon reads %d: %w", b[0], metaVersion, ErrBadMeta)
	}
	if err := json.Unmarshal(b[1:], &m); err != nil {
		return m, fmt.Errorf("%v: %w", err, ErrBadMeta)
	}
	if m.MachineID == "" {
		return m, fmt.Errorf("no machine id: %w", ErrBadMeta)
	}
	return m, nil
}

// JoinProof is a newcomer's claim to a join grant: the grant's id and an
// HMAC under the grant's secret of the newcomer's machine id and
// WireGuard key. It binds the grant to that identity: replayed by a
// machine with another id or key, it proves nothing.
type JoinProof struct {
	Grant string `json:"grant"`
	MAC   string `json:"mac"`
}

// JoinProofFor makes the proof that machine id with WireGuard key wgKey
// holds secret, the secret of grant.
func JoinProofFor(grant string, secret []byte, id, wgKey string) JoinProof {
	mac := hmac.New(sha256.New, secret)
	fmt.Fprintf(mac, "drover join v1\x00%s\x00%s\x00%s", grant, id, wgKey)
	return JoinProof{Grant: grant, MAC: base64.RawStdEncoding.EncodeToString(mac.Sum(nil))}
}

// verifyJoinProof tells whether p proves that m holds secret.
func verifyJoinProof(p JoinProof, secret []byte, m Meta) bool {
	want := JoinProofFor(p.Grant, secret, m.MachineID, m.WGPublicKey)
	return hmac.Equal([]byte(p.MAC), []byte(want.MAC))
}
