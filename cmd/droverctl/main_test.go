package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
)

// stubBackend answers the CLI's requests; the CLI's real use against
// droverd is shown in e2e/.
type stubBackend struct{ ctlapi.Backend }

func (stubBackend) Machines(context.Context) ([]ctlapi.Machine, error) {
	now := time.Now().Add(-3 * time.Second)
	return []ctlapi.Machine{{ID: "0123456789abcdef", Name: "alpha", GossipAddr: "10.0.0.1:7946", State: "active", Liveness: "alive", RaftRole: "leader", LastContact: &now}}, nil
}

func (stubBackend) Status(context.Context) (ctlapi.ClusterStatus, error) {
	return ctlapi.ClusterStatus{Initialized: true, MachineName: "alpha", Role: "leader", LeaderName: "alpha", Term: 7,
		Voters: []ctlapi.RaftServer{{Name: "alpha", Address: "10.0.0.1:7947", Suffrage: "voter", Leader: true}}}, nil
}

func socketWith(t *testing.T, b ctlapi.Backend) string {
	path := filepath.Join(t.TempDir(), "d.sock")
	ln, err := ctlapi.Listen(path, "")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: ctlapi.NewHandler(b, slog.New(slog.NewTextHandler(io.Discard, nil)))}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

func runCLI(t *testing.T, args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestMachineLs(t *testing.T) {
	sock := socketWith(t, stubBackend{})
	code, out, _ := runCLI(t, "--socket", sock, "machine", "ls")
	if code != 0 || !strings.Contains(out, "NAME") || !strings.Contains(out, "alpha") || !strings.Contains(out, "3s ago") || !strings.Contains(out, "leader") {
		t.Fatalf("exit %d, table:\n%s", code, out)
	}
	code, out, _ = runCLI(t, "--socket", sock, "machine", "ls", "--json")
	var ms []ctlapi.Machine
	if code != 0 || json.Unmarshal([]byte(out), &ms) != nil || len(ms) != 1 || ms[0].RaftRole != "leader" {
		t.Fatalf("exit %d, json:\n%s", code, out)
	}
}

func TestClusterStatus(t *testing.T) {
	sock := socketWith(t, stubBackend{})
	code, out, _ := runCLI(t, "--socket", sock, "cluster", "status")
	if code != 0 || !strings.Contains(out, "term:          7") || !strings.Contains(out, "voter") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}

func TestDaemonNotRunningIsOneLine(t *testing.T) {
	code, out, errOut := runCLI(t, "--socket", filepath.Join(t.TempDir(), "none.sock"), "machine", "ls")
	if code != 1 || out != "" || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "droverd is not running") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

// joinBackend records the token it was given.
type joinBackend struct {
	stubBackend
	got *string
}

func (b joinBackend) Join(_ context.Context, req ctlapi.JoinRequest) (ctlapi.ClusterStatus, error) {
	*b.got = req.Token
	return ctlapi.ClusterStatus{Initialized: true, Role: "nonvoter", LeaderName: "alpha"}, nil
}

// The join token carries the cluster key: never an argument, always a
// file or standard input.
func TestJoinTakesTheTokenFromAFileNeverFromArgv(t *testing.T) {
	var got string
	sock := socketWith(t, joinBackend{got: &got})
	code, _, errOut := runCLI(t, "--socket", sock, "cluster", "join", "drover1.secret")
	if code == 0 || got != "" || !strings.Contains(errOut, "never as an argument") {
		t.Fatalf("token as an argument: exit %d, sent %q, stderr %q", code, got, errOut)
	}
	file := filepath.Join(t.TempDir(), "token")
	os.WriteFile(file, []byte("  drover1.secret\n"), 0o600)
	code, out, errOut := runCLI(t, "--socket", sock, "cluster", "join", "--token-file", file)
	if code != 0 || got != "drover1.secret" || !strings.Contains(out, "joined") {
		t.Fatalf("token from a file: exit %d, sent %q, out %q, stderr %q", code, got, out, errOut)
	}
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, nil, 0o600)
	if code, _, errOut := runCLI(t, "--socket", sock, "cluster", "join", "--token-file", empty); code == 0 || !strings.Contains(errOut, "no join token in "+empty) {
		t.Fatalf("empty token file: exit %d, stderr %q", code, errOut)
	}
	if tok, err := readToken(strings.NewReader("drover1.x\nrest"), "-"); err != nil || tok != "drover1.x" {
		t.Fatalf("token from stdin: %q %v", tok, err)
	}
}

func TestReadSecretKeepsTheBytesAndBoundsThem(t *testing.T) {
	v, err := readSecret(strings.NewReader("s3cret\n"), "")
	if err != nil || string(v) != "s3cret\n" {
		t.Fatalf("from stdin: %q %v", v, err)
	}
	if _, err := readSecret(strings.NewReader(""), "-"); err == nil || !strings.Contains(err.Error(), "cannot be empty") {
		t.Fatalf("empty: %v", err)
	}
	big := strings.Repeat("x", maxSecretInput+1)
	if _, err := readSecret(strings.NewReader(big), ""); err == nil || !strings.Contains(err.Error(), "over the limit of 64 KiB") {
		t.Fatalf("oversized: %v", err)
	}
	if _, err := readSecret(nil, "/nonexistent/secret"); err == nil || !strings.Contains(err.Error(), "/nonexistent/secret") {
		t.Fatalf("missing file: %v", err)
	}
}
