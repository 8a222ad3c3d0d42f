package cluster

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// A change of a member's liveness or metadata grows the version and
// closes MembersChanged; a probe's answer does neither.
func TestGossipSaysWhenAMemberChanged(t *testing.T) {
	g := &gossip{logger: slog.New(slog.NewTextHandler(io.Discard, nil)), now: time.Now,
		members: map[string]*Member{}, changed: make(chan struct{}, 1), moved: make(chan struct{})}
	meta, err := encodeMeta(Meta{MachineID: "m1", Name: "one"})
	if err != nil {
		t.Fatal(err)
	}
	node := &memberlist.Node{Name: "m1", Addr: net.IPv4(192, 0, 2, 1), Port: 7946, Meta: meta}
	isClosed := func(c <-chan struct{}) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}

	moved := g.movedChan()
	g.NotifyJoin(node)
	if !isClosed(moved) || g.version.Load() != 1 {
		t.Fatalf("a join: closed %v, version %d", isClosed(moved), g.version.Load())
	}
	moved = g.movedChan()
	g.NotifyPingComplete(node, time.Millisecond, nil)
	if isClosed(moved) || g.version.Load() != 1 {
		t.Fatalf("a probe's answer counted as a change: closed %v, version %d", isClosed(moved), g.version.Load())
	}
	g.NotifyLeave(node)
	if !isClosed(moved) || g.version.Load() != 2 {
		t.Fatalf("a failure: closed %v, version %d", isClosed(moved), g.version.Load())
	}
	if m, _ := g.member("m1"); m.Liveness != LivenessFailed {
		t.Fatalf("liveness %s after a failure", m.Liveness)
	}
}
