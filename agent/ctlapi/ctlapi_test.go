package ctlapi

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeBackend stands in for the daemon: this tests the plumbing only.
type fakeBackend struct{ joined string }

func (f *fakeBackend) Version(context.Context) VersionInfo {
	return VersionInfo{Version: "v-test", APIVersion: APIVersion}
}
func (f *fakeBackend) Status(context.Context) (ClusterStatus, error) {
	return ClusterStatus{Initialized: true, MachineName: "a", Role: "leader"}, nil
}
func (f *fakeBackend) Machines(context.Context) ([]Machine, error) {
	return []Machine{{ID: "1", Name: "a", State: "active"}}, nil
}
func (f *fakeBackend) Init(context.Context) (ClusterStatus, error) {
	return ClusterStatus{}, &APIError{Status: http.StatusConflict, Code: "already_in_cluster", Err: errors.New("already in a cluster")}
}
func (f *fakeBackend) JoinToken(context.Context, JoinTokenRequest) (JoinToken, error) {
	return JoinToken{}, errors.New("disk on fire")
}
func (f *fakeBackend) RotateKey(context.Context) (KeyRotation, error) { return KeyRotation{}, nil }
func (f *fakeBackend) PushImage(context.Context, ImagePushRequest) (ImagePushResult, error) {
	return ImagePushResult{}, nil
}
func (f *fakeBackend) Join(_ context.Context, r JoinRequest) (ClusterStatus, error) {
	f.joined = r.Token
	return ClusterStatus{Initialized: true}, nil
}

func (f *fakeBackend) ServiceLogs(_ context.Context, req LogsRequest, emit func(LogLine)) (LogsResult, error) {
	emit(LogLine{Machine: "m1", Stream: "stdout", Text: "hello from " + req.Service})
	return LogsResult{Lines: 1}, nil
}

func (f *fakeBackend) RemoveNamespace(_ context.Context, ns string, _ RemoveRequest) (RemoveResult, error) {
	return RemoveResult{Namespace: ns}, nil
}

func (f *fakeBackend) Failover(_ context.Context, req FailoverRequest) (FailoverResult, error) {
	return FailoverResult{Service: req.Service}, nil
}

func (f *fakeBackend) SetSecret(_ context.Context, req SecretRequest) (SecretInfo, error) {
	return SecretInfo{Secret: req.Secret, Version: 1, Size: len(req.Value)}, nil
}
func (f *fakeBackend) Secrets(context.Context) ([]SecretInfo, error) { return nil, nil }
func (f *fakeBackend) RemoveSecret(context.Context, string) error    { return nil }

func (f *fakeBackend) RestartService(_ context.Context, service string) (RestartResult, error) {
	return RestartResult{Service: service, Machine: "m1"}, nil
}

func (f *fakeBackend) Events(_ context.Context, _ EventsRequest, emit func(Event)) (EventsEnd, error) {
	emit(Event{Index: 7, Kind: "deploy", Subject: "shop/web", Message: "generation 1 on m1"})
	return EventsEnd{}, nil
}

func (f *fakeBackend) View(context.Context) ViewStatus {
	return ViewStatus{Stale: true, Since: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC), Reason: "this machine knows no leader"}
}

func (f *fakeBackend) Mesh(context.Context) (MeshStatus, error) {
	return MeshStatus{Interface: "drover0"}, nil
}

func (f *fakeBackend) Activate(_ context.Context, name string) (Machine, error) {
	return Machine{Name: name, State: "active"}, nil
}

func (f *fakeBackend) DeployPreview(context.Context, DeployRequest) (DeployPlan, error) {
	return DeployPlan{}, nil
}
func (f *fakeBackend) Deploy(context.Context, DeployRequest, func(DeployEvent)) (DeployResult, error) {
	return DeployResult{}, nil
}
func (f *fakeBackend) Services(context.Context) ([]Service, error) { return nil, nil }
func (f *fakeBackend) Volumes(context.Context) ([]Volume, error)   { return nil, nil }

// Migrate: "ns/ok" succeeds after two events, "ns/late" fails after one,
// anything else fails before any event.
func (f *fakeBackend) Migrate(_ context.Context, r MigrateRequest, emit func(MigrationEvent)) (MigrationInfo, error) {
	switch r.Service {
	case "ns/ok":
		emit(MigrationEvent{ID: "m1", Kind: "phase", Phase: "warm-copy"})
		emit(MigrationEvent{ID: "m1", Kind: "progress", Volume: "data", Bytes: 42})
		return MigrationInfo{ID: "m1", Phase: "done"}, nil
	case "ns/late":
		emit(MigrationEvent{ID: "m2", Kind: "phase", Phase: "warm-copy"})
		return MigrationInfo{ID: "m2", Phase: "aborted"}, &APIError{Status: http.StatusConflict, Code: "migration_aborted", Err: errors.New("target gone")}
	}
	return MigrationInfo{}, &APIError{Status: http.StatusConflict, Code: "preflight_failed", Err: errors.New("pre-flight failed")}
}
func (f *fakeBackend) Rollback(ctx context.Context, id string, emit func(MigrationEvent)) (MigrationInfo, error) {
	return f.Migrate(ctx, MigrateRequest{Service: "ns/" + id}, emit)
}
func (f *fakeBackend) Migrations(context.Context) ([]MigrationInfo, error) { return nil, nil }
func (f *fakeBackend) Migration(_ context.Context, id string) (MigrationInfo, error) {
	return MigrationInfo{ID: id}, nil
}
func (f *fakeBackend) RenderManifest(context.Context, MigrateRequest) (RenderedManifest, error) {
	return RenderedManifest{Namespace: "ns", Text: "namespace = \"ns\"\n"}, nil
}
func (f *fakeBackend) AbortMigration(_ context.Context, id string) (MigrationInfo, error) {
	return MigrationInfo{ID: id, Phase: "aborted"}, nil
}
func (f *fakeBackend) PurgeSource(_ context.Context, id string) (MigrationInfo, error) {
	return MigrationInfo{ID: id}, nil
}

func (f *fakeBackend) Drain(_ context.Context, req DrainRequest, emit func(DrainEvent)) (DrainInfo, error) {
	emit(DrainEvent{Service: "shop/web", State: "moved"})
	return DrainInfo{Machine: req.Machine, State: "drained", Parallel: req.Parallel, Moved: 1}, nil
}

func (f *fakeBackend) DrainStatus(_ context.Context, machine string) (DrainInfo, error) {
	return DrainInfo{Machine: machine, State: "running"}, nil
}

func (f *fakeBackend) RemoveMachine(_ context.Context, req RemoveMachineRequest) (RemovedMachine, error) {
	return RemovedMachine{Machine: req.Machine, Lost: []string{"volume shop/data"}}, nil
}

func (f *fakeBackend) Probe(_ context.Context, req ProbeRequest) (ProbeResult, error) {
	return ProbeResult{Machine: "a", Proposers: req.Proposers, Committed: req.Count, P50: req.Timeout}, nil
}

func (f *fakeBackend) MigratePreview(context.Context, MigrateRequest) (MigrationPlan, error) {
	return MigrationPlan{}, nil
}

func serve(t *testing.T) (*Client, string, *fakeBackend) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "d.sock")
	ln, err := Listen(path, "no-such-group-here")
	if err != nil {
		t.Fatal(err)
	}
	fb := &fakeBackend{}
	srv := &http.Server{Handler: NewHandler(fb, slog.New(slog.NewTextHandler(io.Discard, nil)))}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return &Client{SocketPath: path}, path, fb
}

func TestRoutesAndErrors(t *testing.T) {
	c, path, fb := serve(t)
	ctx := context.Background()
	if v, err := c.Version(ctx); err != nil || v.Version != "v-test" {
		t.Fatalf("version %+v %v", v, err)
	}
	if ms, err := c.Machines(ctx); err != nil || len(ms) != 1 || ms[0].Name != "a" {
		t.Fatalf("machines %+v %v", ms, err)
	}
	if st, err := c.Status(ctx); err != nil || st.Role != "leader" {
		t.Fatalf("status %+v %v", st, err)
	}
	// A machine cut off from the leader says so, and since when.
	view, err := c.View(ctx)
	if err != nil || !view.Stale {
		t.Fatalf("view %+v %v", view, err)
	}
	if w := view.Warning(view.Since.Add(90 * time.Second)); !strings.Contains(w, "knows no leader") || !strings.Contains(w, "1m30s ago") || !strings.Contains(w, "may be stale") {
		t.Fatalf("warning %q", w)
	}
	if w := (ViewStatus{}).Warning(time.Now()); w != "" {
		t.Fatalf("a fresh view warns: %q", w)
	}
	if _, err := c.Join(ctx, JoinRequest{Token: "tok"}); err != nil || fb.joined != "tok" {
		t.Fatalf("join: %v, backend got %q", err, fb.joined)
	}
	if m, err := c.Activate(ctx, "b/../x"); err != nil || m.Name != "b/../x" {
		t.Fatalf("activate with an odd name: %+v %v", m, err)
	}
	if r, err := c.Probe(ctx, ProbeRequest{Proposers: 32, Count: 64, Timeout: Duration(time.Second)}); err != nil || r.Proposers != 32 || r.Committed != 64 || r.P50 != Duration(time.Second) {
		t.Fatalf("probe: %+v %v", r, err)
	}
	var apiErr *APIError
	if _, err := c.Init(ctx); !errors.As(err, &apiErr) || apiErr.Status != http.StatusConflict || apiErr.Code != "already_in_cluster" {
		t.Fatalf("init: %v", err)
	}
	if _, err := c.JoinToken(ctx, JoinTokenRequest{}); !errors.As(err, &apiErr) || apiErr.Status != 500 || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("join-token: %v", err)
	}
	raw := func(method, p, version, body string) (int, string) {
		hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return net.Dial("unix", path)
		}}}
		req, _ := http.NewRequest(method, "http://d"+p, strings.NewReader(body))
		if version != "" {
			req.Header.Set(VersionHeader, version)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := raw("GET", "/v1/nope", "", ""); code != 404 || !strings.Contains(body, `"error"`) {
		t.Errorf("unknown route: %d %s", code, body)
	}
	if code, body := raw("POST", "/v1/machines", "", ""); code != 405 || !strings.Contains(body, "method_not_allowed") {
		t.Errorf("wrong method: %d %s", code, body)
	}
	if code, body := raw("GET", "/v1/status", "99", ""); code != 400 || !strings.Contains(body, `\"99\"`) {
		t.Errorf("version mismatch: %d %s", code, body)
	}
	if code, body := raw("POST", "/v1/cluster/join", "", `{"token":"x","extra":1}`); code != 400 || !strings.Contains(body, "extra") {
		t.Errorf("unknown field: %d %s", code, body)
	}
}

func TestSocketModeAndStaleAndLive(t *testing.T) {
	_, path, _ := serve(t)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600 without the group", fi.Mode().Perm())
	}
	if _, err := Listen(path, ""); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	// A stale socket file (nobody listening) is replaced.
	stale := filepath.Join(t.TempDir(), "stale.sock")
	l, _ := net.Listen("unix", stale)
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	ln, err := Listen(stale, "")
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	ln.Close()
}

func TestDaemonNotRunning(t *testing.T) {
	c := &Client{SocketPath: filepath.Join(t.TempDir(), "none.sock")}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := c.Status(ctx)
	if !errors.Is(err, ErrDaemonNotRunning) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("got %q, want a one-line ErrDaemonNotRunning", err)
	}
}

func TestMigrateStreamsEventsThenTheOutcome(t *testing.T) {
	c, _, _ := serve(t)
	ctx := context.Background()
	var events []MigrationEvent
	info, err := c.Migrate(ctx, MigrateRequest{Service: "ns/ok"}, func(ev MigrationEvent) { events = append(events, ev) })
	if err != nil || info.ID != "m1" || info.Phase != "done" || len(events) != 2 || events[1].Bytes != 42 {
		t.Fatalf("success: %+v %v, events %+v", info, err, events)
	}
	events = nil
	info, err = c.Migrate(ctx, MigrateRequest{Service: "ns/late"}, func(ev MigrationEvent) { events = append(events, ev) })
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Code != "migration_aborted" || info.Phase != "aborted" || len(events) != 1 {
		t.Fatalf("failure after events: %+v %v, events %+v", info, err, events)
	}
	_, err = c.Rollback(ctx, "early", nil)
	if !errors.As(err, &apiErr) || apiErr.Code != "preflight_failed" || apiErr.Status != http.StatusConflict {
		t.Fatalf("failure before any event: %v", err)
	}
}

func TestDrainStreamsThroughTheSameLines(t *testing.T) {
	c, _, _ := serve(t)
	var events []DrainEvent
	info, err := c.Drain(context.Background(), DrainRequest{Machine: "dl1", Parallel: 2, Wait: true}, func(ev DrainEvent) { events = append(events, ev) })
	if err != nil || info.Machine != "dl1" || info.State != "drained" || info.Parallel != 2 || len(events) != 1 || events[0].Service != "shop/web" {
		t.Fatalf("drain: %+v %v, events %+v", info, err, events)
	}
}

// Whoever may write the socket's directory may replace the socket: such
// a directory is refused, and a socket somebody put in place of ours is
// left alone at shutdown.
func TestLooseSocketDirectoryIsRefusedAndOnlyOurSocketRemoved(t *testing.T) {
	loose := t.TempDir()
	os.Chmod(loose, 0o777)
	if _, err := Listen(filepath.Join(loose, "d.sock"), ""); !errors.Is(err, ErrLooseSocketDir) || !strings.Contains(err.Error(), loose) {
		t.Fatalf("socket in a world-writable directory: %v", err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "d.sock")
	ln, err := Listen(path, "")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// Someone replaced it: Remove leaves theirs.
	os.Remove(path)
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := ln.Remove(); err == nil {
		t.Fatal("removed a socket this daemon did not make")
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the other socket is gone: %v", err)
	}
	// Its own it removes.
	os.Remove(path)
	ln2, err := Listen(filepath.Join(dir, "e.sock"), "")
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	if err := ln2.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "e.sock")); !os.IsNotExist(err) {
		t.Fatalf("its own socket is still there: %v", err)
	}
}
