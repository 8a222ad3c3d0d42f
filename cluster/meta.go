package cluster

import (
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
	// Leaving is gossiped just before a clean departure, so the others
	// record "left" rather than "failed" (memberlist's leave event does
	// not say which).
	Leaving bool `json:"leaving,omitempty"`
}

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
