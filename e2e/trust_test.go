package e2e

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/lab"
)

// attackOverlay plays someone who reaches a member's overlay address
// without being a peer of the mesh, from host from: a process on the
// member itself, or an underlay neighbour that routes the overlay range
// to it. Holding the cluster key (a leaked join token) does not help. It
// sends Raft an AppendEntries with a far higher term carrying a command,
// and the RPC server an apply with the key's token. Each error is nil
// when the server answered at all (it was reached, whatever it said), and
// the connection's failure when it was refused.
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
		// An answer of any kind, success or not, means Raft was reached.
		if err := trans.AppendEntries("intruder", raft.ServerAddress(overlay+":7947"), &req, &resp); connectionFailed(err) {
			raftErr = err
		}

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
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("cluster key %s: %v", file, err)
	}
	return key
}

// connectionFailed tells a refused or dropped connection from an answer.
func connectionFailed(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}
