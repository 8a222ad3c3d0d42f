package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// attackOverlay plays someone who reaches a member's overlay address
// without being a peer of the mesh, from host from: a process on the
// member itself, or an underlay neighbour that routes the overlay range
// to it. Holding the cluster key (a leaked join token) does not help. It
// sends Raft an AppendEntries with a far higher term carrying a command,
// and the RPC server an apply with the key's token. Each error is nil
// when the server answered (it was reached, whatever it said), and the
// failure when it was not.
func attackOverlay(t *testing.T, from *lab.Host, overlay, keyFile string) (raftErr, rpcErr error) {
	t.Helper()
	key := readClusterKey(t, keyFile)
	cmd, err := fsm.Encode(fsm.Probe{Machine: "intruder", Seq: 1, At: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	err = inNetns(from, func() error {
		trans, err := raft.NewTCPTransport(from.UnderlayIP+":0", nil, 1, 3*time.Second, io.Discard)
		if err != nil {
			return err
		}
		defer trans.Close()
		req := raft.AppendEntriesRequest{RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("intruder"), Addr: []byte(from.UnderlayIP)},
			Term: 1 << 40, PrevLogEntry: 0, PrevLogTerm: 0, LeaderCommitIndex: 1,
			Entries: []*raft.Log{{Index: 1, Term: 1 << 40, Type: raft.LogCommand, Data: cmd}}}
		var resp raft.AppendEntriesResponse
		// A decoded answer, success or not, means Raft was reached; a
		// connection closed on accept shows as EOF or, mid-decode, as the
		// codec's own error.
		raftErr = trans.AppendEntries("intruder", raft.ServerAddress(overlay+":7947"), &req, &resp)

		mac := hmac.New(sha256.New, key)
		mac.Write([]byte("drover rpc v1"))
		hreq, _ := http.NewRequest(http.MethodPost, "http://"+overlay+":7948/rpc/v1/apply", bytes.NewReader(cmd))
		hreq.Header.Set("Drover-Cluster-Auth", hex.EncodeToString(mac.Sum(nil)))
		// Dialled here, on the thread in the host's namespace (an
		// http.Client would dial from another thread).
		conn, err := net.DialTimeout("tcp", overlay+":7948", 3*time.Second)
		if err != nil {
			rpcErr = err
			return nil
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		if err := hreq.Write(conn); err != nil {
			rpcErr = err
			return nil
		}
		answer, err := http.ReadResponse(bufio.NewReader(conn), hreq)
		if err != nil {
			rpcErr = err
			return nil
		}
		answer.Body.Close() // an answer, whatever its status: reached
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return raftErr, rpcErr
}

func readClusterKey(t *testing.T, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		t.Fatalf("cluster key %s: %v", file, err)
	}
	return key
}

// machineNamed finds a machine in d's `machine ls`.
func machineNamed(t *testing.T, d *labDaemon, name string) (ctlapi.Machine, bool) {
	t.Helper()
	ms, err := d.machines()
	if err != nil {
		t.Fatal(err)
	}
	m, ok := byName(ms)[name]
	return m, ok
}

// TestLabTrust: membership is granted, never just taken. On four real
// hosts: an expired token is refused before anything starts; a
// single-use token admits one machine; a removed machine coming back with
// its old identity (data dir intact) is refused and gets no mesh peer or
// Raft seat, and a fresh machine cannot reuse the spent single-use token;
// a 379 KB manifest sent through a follower is refused with the limit
// named while the cluster keeps committing; the gossip key is rotated
// while clients on three hosts write to a service, with no failed write,
// no machine ever seen other than alive, every machine on the new key
// alone, and a token made before the rotation refused afterwards.
func TestLabTrust(t *testing.T) {
	h, daemons := workloadLabJoined(t, "dt", 4, 3)
	bin := binaries(t)
	d1, d3 := daemons[0], daemons[2]
	spare := h[3]
	spareArgs := []string{"--docker-host", "unix://" + spare.DockerSock, "--zfs-parent", spare.Pool + "/drover"}

	// An expired token: refused by the joiner itself, naming the expiry.
	expired := joinTokenFile(t, d1, "--ttl", "1s")
	time.Sleep(1500 * time.Millisecond)
	dn := startLabDaemon(t, bin, spare, spareArgs...)
	if out, err := dn.ctl("cluster", "join", "--token-file", expired); err == nil || !strings.Contains(out, "expired at") {
		t.Fatalf("join with an expired token: %v\n%s", err, out)
	}

	// A single-use token admits this machine.
	once := joinTokenFile(t, d1, "--single-use")
	if out, err := dn.ctlWithin(60*time.Second, "cluster", "join", "--token-file", once); err != nil {
		t.Fatalf("join with a single-use token: %v\n%s", err, out)
	}
	var admitted ctlapi.Machine
	testpoll.Until(t, 60*time.Second, spare.Name+" admitted, with an overlay address and a Raft seat", func() error {
		m, ok := machineNamed(t, d1, spare.Name)
		if !ok || m.OverlayIP == "" || m.RaftRole == "none" || m.Liveness != "alive" {
			return fmt.Errorf("%+v", m)
		}
		admitted = m
		return nil
	})

	// Removed while its daemon is down, it comes back with its old
	// identity (the data dir kept): refused, no mesh peer, no Raft seat.
	if err := dn.proc.Stop(20 * time.Second); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 30*time.Second, spare.Name+" gone from gossip", func() error {
		if m, _ := machineNamed(t, d1, spare.Name); m.Liveness == "alive" || m.Liveness == "suspect" {
			return fmt.Errorf("%s", m.Liveness)
		}
		return nil
	})
	if out, err := d1.ctl("machine", "rm", spare.Name); err != nil {
		t.Fatalf("machine rm: %v\n%s", err, out)
	}
	dn.start(t)
	testpoll.Until(t, 60*time.Second, "the leader refusing the removed machine", func() error {
		for _, d := range daemons {
			b, _ := os.ReadFile(d.proc.LogPath())
			if strings.Contains(string(b), "refused to admit a machine") && strings.Contains(string(b), "was removed from the cluster") {
				return nil
			}
		}
		return errors.New("no refusal logged")
	})
	time.Sleep(3 * time.Second) // reconcile rounds in which it could have got in
	if m, ok := machineNamed(t, d1, spare.Name); ok {
		t.Logf("%s lists the returning removed machine as %s, %s, raft role %s", d1.host.Name, m.State, m.Liveness, m.RaftRole)
	}
	for _, d := range daemons {
		// Listed while it still gossips, it shows as removed: no overlay
		// address, no Raft role, not following the facts.
		if m, ok := machineNamed(t, d, spare.Name); ok && (m.OverlayIP != "" || m.RaftRole != "none" || (m.Liveness == "alive" && m.State != "removed")) {
			t.Fatalf("%s lists the removed machine as a member: %+v", d.host.Name, m)
		}
		out, err := d.ctl("mesh", "status", "--json")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out, admitted.WGPublicKey) {
			t.Fatalf("%s keeps the removed machine's WireGuard key as a peer:\n%s", d.host.Name, out)
		}
	}
	if err := dn.proc.Stop(20 * time.Second); err != nil {
		t.Fatal(err)
	}

	// A key holder claiming a member's id (dt2's, copied) with its own
	// WireGuard key changes no peer: the member stays alive and reachable
	// at its own endpoint everywhere.
	claimed := h[1]
	peerOf := func(d *labDaemon) ctlapi.MeshPeer {
		out, err := d.ctl("mesh", "status", "--json")
		if err != nil {
			t.Fatal(err)
		}
		var ms ctlapi.MeshStatus
		if err := json.Unmarshal([]byte(out), &ms); err != nil {
			t.Fatal(err)
		}
		for _, p := range ms.Peers {
			if p.Machine == claimed.Name {
				return p
			}
		}
		t.Fatalf("%s has no peer for %s: %s", d.host.Name, claimed.Name, out)
		return ctlapi.MeshPeer{}
	}
	want := map[string]ctlapi.MeshPeer{}
	for _, d := range []*labDaemon{daemons[0], daemons[2]} {
		want[d.host.Name] = peerOf(d)
	}
	idOf, err := os.ReadFile(filepath.Join(claimed.Dir, "drover", "machine-id"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(spare.Dir, "drover")); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(spare.Dir, "drover"), 0o700)
	if err := os.WriteFile(filepath.Join(spare.Dir, "drover", "machine-id"), idOf, 0o600); err != nil {
		t.Fatal(err)
	}
	impostor := startLabDaemon(t, bin, spare, append(spareArgs, "--join-token-file", joinTokenFile(t, d1))...)
	time.Sleep(8 * time.Second) // gossip rounds and reconciles in which it could take over
	for _, d := range []*labDaemon{daemons[0], daemons[2]} {
		if got := peerOf(d); got.PublicKey != want[d.host.Name].PublicKey || got.Endpoint != want[d.host.Name].Endpoint {
			t.Fatalf("%s's peer for %s changed under a forged claim: %+v, was %+v", d.host.Name, claimed.Name, got, want[d.host.Name])
		}
		if m, _ := machineNamed(t, d, claimed.Name); m.Liveness != "alive" {
			t.Fatalf("%s sees %s %s under a forged claim", d.host.Name, claimed.Name, m.Liveness)
		}
	}
	for _, d := range daemons[:3] {
		b, _ := os.ReadFile(d.proc.LogPath())
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "another WireGuard key") || strings.Contains(line, "Conflicting address") {
				t.Logf("%s: %s", d.host.Name, line)
				break
			}
		}
	}
	if err := impostor.proc.Stop(20 * time.Second); err != nil {
		t.Logf("impostor: %v", err)
	}

	// A fresh machine there (new id and key) cannot reuse the spent
	// single-use token; a new token admits it.
	if err := os.RemoveAll(filepath.Join(spare.Dir, "drover")); err != nil {
		t.Fatal(err)
	}
	dn.start(t)
	if out, err := dn.ctlWithin(60*time.Second, "cluster", "join", "--token-file", once); err == nil || !strings.Contains(out, "single-use") {
		t.Fatalf("a second join with a single-use token: %v\n%s", err, out)
	}
	preRotation := joinTokenFile(t, d1)
	if out, err := dn.ctlWithin(60*time.Second, "cluster", "join", "--token-file", preRotation); err != nil {
		t.Fatalf("join as a new machine: %v\n%s", err, out)
	}
	testpoll.Until(t, 60*time.Second, spare.Name+" a member again under a new id", func() error {
		m, ok := machineNamed(t, d1, spare.Name)
		if !ok || m.ID == admitted.ID || m.OverlayIP == "" || m.RaftRole == "none" {
			return fmt.Errorf("%+v", m)
		}
		return nil
	})
	daemons = append(daemons, dn)

	// A manifest of 379 KB through a follower: refused, the limit named;
	// nothing committed, and the cluster keeps committing.
	var follower *labDaemon
	for _, d := range daemons {
		if st, err := d.status(); err == nil && st.Role != "leader" {
			follower = d
			break
		}
	}
	// Many ports, written tersely: the command's encoding is some four
	// times the manifest's size.
	var big strings.Builder
	big.WriteString("namespace = \"huge\"\n\n[services.web]\nimage = \"drover-test:latest\"\nports = [")
	for port := 1; big.Len() < 379<<10; port++ {
		fmt.Fprintf(&big, "{port=%d},", port)
	}
	big.WriteString("]\n")
	out, err := follower.ctl("deploy", "-f", writeManifest(t, "huge.toml", big.String()))
	if err == nil || !strings.Contains(out, "KiB") {
		t.Fatalf("a 379 KB manifest through %s: %v\n%s", follower.host.Name, err, out)
	}
	t.Logf("379 KB manifest through follower %s: %s", follower.host.Name, strings.TrimSpace(out))
	if ss := services(t, d1); len(ss) != 0 {
		t.Fatalf("the refused manifest left services: %+v", ss)
	}

	// A service, and clients writing to it from three hosts.
	mf := writeManifest(t, "shop.toml", fmt.Sprintf(shopManifest, "a", h[1].Name, "0s"))
	testpoll.Until(t, 60*time.Second, "deploy", func() error {
		out, err := d1.ctl("deploy", "-f", mf)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	ip := services(t, d1)[0].ServiceIP
	var writers []*writer
	for _, host := range h[:3] {
		testpoll.Until(t, 30*time.Second, "the service from "+host.Name, func() error {
			_, err := host.Run(context.Background(), "curl", "-sf", "-m", "2", "http://"+ip+":80/healthz")
			return err
		})
		writers = append(writers, startWriter(host, ip, 100*time.Millisecond))
	}
	// Membership as the first host sees it, all along the rotation.
	blips := map[string]bool{}
	var blipMu sync.Mutex
	watchDone, stopWatch := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			select {
			case <-stopWatch:
				return
			case <-time.After(200 * time.Millisecond):
			}
			ms, err := d1.machines()
			if err != nil {
				continue
			}
			for _, m := range ms {
				if m.Liveness != "alive" {
					blipMu.Lock()
					blips[m.Name+" "+m.Liveness] = true
					blipMu.Unlock()
				}
			}
		}
	}()
	time.Sleep(2 * time.Second)
	before, _ := d1.status()
	rotated, err := d3.ctlWithin(3*time.Minute, "cluster", "rotate-key", "--json")
	if err != nil {
		t.Fatalf("rotate-key: %v\n%s", err, rotated)
	}
	var rot ctlapi.KeyRotation
	if err := json.Unmarshal([]byte(rotated), &rot); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	close(stopWatch)
	<-watchDone
	for i, w := range writers {
		acked := w.Stop()
		if w.Failed() > 0 || len(acked) == 0 {
			t.Errorf("client on %s: %d writes acknowledged, %d failed during the rotation", h[i].Name, len(acked), w.Failed())
		}
		requireAcked(t, dataDir(h[1]), acked)
	}
	if len(blips) > 0 {
		t.Errorf("membership changed during the rotation: %v", blips)
	}
	if len(rot.Confirmed) != 4 || rot.OldKey != before.GossipKeys[0] || rot.NewKey == rot.OldKey {
		t.Fatalf("rotation %+v (keys before %v)", rot, before.GossipKeys)
	}
	for _, d := range daemons {
		st, err := d.status()
		if err != nil || len(st.GossipKeys) != 1 || st.GossipKeys[0] != rot.NewKey {
			t.Fatalf("%s after the rotation holds keys %v (want only %s): %v", d.host.Name, st.GossipKeys, rot.NewKey, err)
		}
	}
	t.Logf("rotation %s -> %s confirmed by %v", rot.OldKey, rot.NewKey, rot.Confirmed)

	// The old key is refused: a new machine with a token from before.
	if err := dn.proc.Stop(20 * time.Second); err != nil {
		t.Fatal(err)
	}
	testpoll.Until(t, 30*time.Second, spare.Name+" gone from gossip again", func() error {
		if m, _ := machineNamed(t, d1, spare.Name); m.Liveness == "alive" || m.Liveness == "suspect" {
			return fmt.Errorf("%s", m.Liveness)
		}
		return nil
	})
	if out, err := d1.ctl("machine", "rm", spare.Name); err != nil {
		t.Fatalf("machine rm: %v\n%s", err, out)
	}
	os.RemoveAll(filepath.Join(spare.Dir, "drover"))
	dn.start(t)
	if out, err := dn.ctlWithin(60*time.Second, "cluster", "join", "--token-file", preRotation); err == nil || !strings.Contains(out, "cluster key") {
		t.Fatalf("join with a token from before the rotation: %v\n%s", err, out)
	} else {
		t.Logf("token from before the rotation: %s", strings.TrimSpace(out))
	}
}
