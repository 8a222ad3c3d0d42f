package ctlapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Backend is what the daemon provides to the control API.
type Backend interface {
	Version(context.Context) VersionInfo
	Status(context.Context) (ClusterStatus, error)
	Machines(context.Context) ([]Machine, error)
	Init(context.Context) (ClusterStatus, error)
	JoinToken(context.Context, JoinTokenRequest) (JoinToken, error)
	RotateKey(context.Context) (KeyRotation, error)
	PushImage(context.Context, ImagePushRequest) (ImagePushResult, error)
	Join(context.Context, JoinRequest) (ClusterStatus, error)
	Mesh(context.Context) (MeshStatus, error)
	View(context.Context) ViewStatus
	Events(context.Context, EventsRequest, func(Event)) (EventsEnd, error)
	ServiceLogs(context.Context, LogsRequest, func(LogLine)) (LogsResult, error)
	RestartService(ctx context.Context, service string) (RestartResult, error)
	Failover(context.Context, FailoverRequest) (FailoverResult, error)
	SetSecret(context.Context, SecretRequest) (SecretInfo, error)
	Secrets(context.Context) ([]SecretInfo, error)
	RemoveSecret(ctx context.Context, secret string) error
	Activate(ctx context.Context, machine string) (Machine, error)
	DeployPreview(context.Context, DeployRequest) (DeployPlan, error)
	RemoveNamespace(ctx context.Context, namespace string, req RemoveRequest) (RemoveResult, error)
	Deploy(ctx context.Context, req DeployRequest, emit func(DeployEvent)) (DeployResult, error)
	Services(context.Context) ([]Service, error)
	Volumes(context.Context) ([]Volume, error)
	// Migrate and Rollback block until the migration ends, calling emit
	// (never concurrently) for each of its events.
	Migrate(ctx context.Context, req MigrateRequest, emit func(MigrationEvent)) (MigrationInfo, error)
	Rollback(ctx context.Context, id string, emit func(MigrationEvent)) (MigrationInfo, error)
	Migrations(context.Context) ([]MigrationInfo, error)
	Migration(ctx context.Context, id string) (MigrationInfo, error)
	MigratePreview(context.Context, MigrateRequest) (MigrationPlan, error)
	RenderManifest(context.Context, MigrateRequest) (RenderedManifest, error)
	AbortMigration(ctx context.Context, id string) (MigrationInfo, error)
	PurgeSource(ctx context.Context, id string) (MigrationInfo, error)
	// Drain starts (or, when one runs, follows) the drain of a machine;
	// with req.Wait it blocks until the drain ends, calling emit for its
	// events, else it returns once the drain started.
	Drain(ctx context.Context, req DrainRequest, emit func(DrainEvent)) (DrainInfo, error)
	DrainStatus(ctx context.Context, machine string) (DrainInfo, error)
	RemoveMachine(ctx context.Context, req RemoveMachineRequest) (RemovedMachine, error)
	// Probe commits no-op entries through the fact store and times them.
	Probe(context.Context, ProbeRequest) (ProbeResult, error)
}

func migrationKnown(m MigrationInfo) bool { return m.ID != "" }

const maxRequestBody = 1 << 20

// NewHandler serves the /v1/ routes on b.
func NewHandler(b Backend, logger *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	get := func(path string, fn func(*http.Request) (any, error)) { route(mux, logger, "GET", path, fn) }
	post := func(path string, fn func(*http.Request) (any, error)) { route(mux, logger, "POST", path, fn) }

	get("/v1/version", func(r *http.Request) (any, error) { return b.Version(r.Context()), nil })
	get("/v1/status", func(r *http.Request) (any, error) { return b.Status(r.Context()) })
	get("/v1/machines", func(r *http.Request) (any, error) { return b.Machines(r.Context()) })
	post("/v1/cluster/init", func(r *http.Request) (any, error) { return b.Init(r.Context()) })
	post("/v1/machines/{name}/activate", func(r *http.Request) (any, error) { return b.Activate(r.Context(), r.PathValue("name")) })
	post("/v1/deploy/preview", func(r *http.Request) (any, error) {
		var req DeployRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.DeployPreview(r.Context(), req)
	})
	streamed(mux, logger, "/v1/deploy", func(r *http.Request, emit func(DeployEvent)) (DeployResult, error) {
		var req DeployRequest
		if err := decodeBody(r, &req); err != nil {
			return DeployResult{}, err
		}
		return b.Deploy(r.Context(), req, emit)
	}, func(r DeployResult) bool { return r.Plan.Namespace != "" })
	streamed(mux, logger, "/v1/migrate", func(r *http.Request, emit func(MigrationEvent)) (MigrationInfo, error) {
		var req MigrateRequest
		if err := decodeBody(r, &req); err != nil {
			return MigrationInfo{}, err
		}
		return b.Migrate(r.Context(), req, emit)
	}, migrationKnown)
	streamed(mux, logger, "/v1/events", func(r *http.Request, emit func(Event)) (EventsEnd, error) {
		var req EventsRequest
		if err := decodeBody(r, &req); err != nil {
			return EventsEnd{}, err
		}
		return b.Events(r.Context(), req, emit)
	}, func(EventsEnd) bool { return true })
	streamed(mux, logger, "/v1/services/logs", func(r *http.Request, emit func(LogLine)) (LogsResult, error) {
		var req LogsRequest
		if err := decodeBody(r, &req); err != nil {
			return LogsResult{}, err
		}
		return b.ServiceLogs(r.Context(), req, emit)
	}, func(LogsResult) bool { return true })
	streamed(mux, logger, "/v1/migrations/{id}/rollback", func(r *http.Request, emit func(MigrationEvent)) (MigrationInfo, error) {
		return b.Rollback(r.Context(), r.PathValue("id"), emit)
	}, migrationKnown)
	streamed(mux, logger, "/v1/machines/{name}/drain", func(r *http.Request, emit func(DrainEvent)) (DrainInfo, error) {
		var req DrainRequest
		if err := decodeBody(r, &req); err != nil {
			return DrainInfo{}, err
		}
		req.Machine = r.PathValue("name")
		return b.Drain(r.Context(), req, emit)
	}, func(d DrainInfo) bool { return d.Machine != "" })
	get("/v1/machines/{name}/drain", func(r *http.Request) (any, error) { return b.DrainStatus(r.Context(), r.PathValue("name")) })
	post("/v1/machines/{name}/remove", func(r *http.Request) (any, error) {
		var req RemoveMachineRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		req.Machine = r.PathValue("name")
		return b.RemoveMachine(r.Context(), req)
	})
	get("/v1/migrations/{id}", func(r *http.Request) (any, error) { return b.Migration(r.Context(), r.PathValue("id")) })
	post("/v1/migrations/{id}/abort", func(r *http.Request) (any, error) { return b.AbortMigration(r.Context(), r.PathValue("id")) })
	post("/v1/migrations/{id}/purge-source", func(r *http.Request) (any, error) { return b.PurgeSource(r.Context(), r.PathValue("id")) })
	post("/v1/migrate/render-manifest", func(r *http.Request) (any, error) {
		var req MigrateRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.RenderManifest(r.Context(), req)
	})
	post("/v1/migrate/preview", func(r *http.Request) (any, error) {
		var req MigrateRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.MigratePreview(r.Context(), req)
	})
	get("/v1/migrations", func(r *http.Request) (any, error) { return b.Migrations(r.Context()) })
	get("/v1/services", func(r *http.Request) (any, error) { return b.Services(r.Context()) })
	get("/v1/volumes", func(r *http.Request) (any, error) { return b.Volumes(r.Context()) })
	get("/v1/mesh", func(r *http.Request) (any, error) { return b.Mesh(r.Context()) })
	get("/v1/view", func(r *http.Request) (any, error) { return b.View(r.Context()), nil })
	post("/v1/namespaces/{ns}/remove", func(r *http.Request) (any, error) {
		var req RemoveRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.RemoveNamespace(r.Context(), r.PathValue("ns"), req)
	})
	get("/v1/secrets", func(r *http.Request) (any, error) { return b.Secrets(r.Context()) })
	post("/v1/secrets/set", func(r *http.Request) (any, error) {
		var req SecretRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.SetSecret(r.Context(), req)
	})
	post("/v1/secrets/{ns}/{name}/remove", func(r *http.Request) (any, error) {
		return struct{}{}, b.RemoveSecret(r.Context(), r.PathValue("ns")+"/"+r.PathValue("name"))
	})
	post("/v1/services/failover", func(r *http.Request) (any, error) {
		var req FailoverRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.Failover(r.Context(), req)
	})
	post("/v1/services/{ns}/{name}/restart", func(r *http.Request) (any, error) {
		return b.RestartService(r.Context(), r.PathValue("ns")+"/"+r.PathValue("name"))
	})
	post("/v1/cluster/probe", func(r *http.Request) (any, error) {
		var req ProbeRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.Probe(r.Context(), req)
	})
	post("/v1/cluster/join-token", func(r *http.Request) (any, error) {
		var req JoinTokenRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.JoinToken(r.Context(), req)
	})
	post("/v1/cluster/rotate-key", func(r *http.Request) (any, error) { return b.RotateKey(r.Context()) })
	post("/v1/images/push", func(r *http.Request) (any, error) {
		var req ImagePushRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.PushImage(r.Context(), req)
	})
	post("/v1/cluster/join", func(r *http.Request) (any, error) {
		var req JoinRequest
		if err := decodeBody(r, &req); err != nil {
			return nil, err
		}
		return b.Join(r.Context(), req)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, logger, &APIError{Status: http.StatusNotFound, Code: CodeNotFound, Err: fmt.Errorf("no route %s %s", r.Method, r.URL.Path)})
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			// Every call that may change something names who made it.
			var uid any = "unknown"
			if v, ok := r.Context().Value(peerUIDKey{}).(uint32); ok {
				uid = v
			}
			logger.Info("control API call", "method", r.Method, "path", r.URL.Path, "uid", uid)
		}
		w.Header().Set(VersionHeader, APIVersion)
		if v := r.Header.Get(VersionHeader); v != "" && v != APIVersion {
			writeError(w, logger, &APIError{Status: http.StatusBadRequest, Code: CodeVersionMismatch, Err: versionMismatch(APIVersion, v)})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// route registers one method+path; the same path with another method gets 405.
func route(mux *http.ServeMux, logger *slog.Logger, method, path string, fn func(*http.Request) (any, error)) {
	mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != method {
			w.Header().Set("Allow", method)
			writeError(w, logger, &APIError{Status: http.StatusMethodNotAllowed, Code: CodeMethodNotAllowed, Err: fmt.Errorf("%s wants %s, not %s", path, method, r.Method)})
			return
		}
		v, err := fn(r)
		if err != nil {
			writeError(w, logger, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(w).Encode(v); err != nil {
			logger.Warn("writing control API answer", "path", path, "err", err)
		}
	})
}

// streamed registers a POST that answers in JSON lines: the events as
// they happen, then the result or the error. Errors before the first
// event still get their HTTP status.
// streamed serves a long request as NDJSON lines: its events while it
// runs, then its result or its error (with the result too when known says
// there is one).
func streamed[E, R any](mux *http.ServeMux, logger *slog.Logger, path string, fn func(*http.Request, func(E)) (R, error), known func(R) bool) {
	mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		enc := json.NewEncoder(w)
		started := false
		begin := func() {
			if !started {
				w.Header().Set("Content-Type", "application/x-ndjson")
				w.WriteHeader(http.StatusOK)
				started = true
			}
		}
		emit := func(ev E) {
			begin()
			enc.Encode(StreamLine[E, R]{Event: &ev}) // a client gone is not the migration's problem
			rc.Flush()
		}
		info, err := fn(r, emit)
		if err != nil && !started {
			writeError(w, logger, err)
			return
		}
		begin()
		line := StreamLine[E, R]{Result: &info}
		if err != nil {
			apiErr := &APIError{Code: CodeInternal}
			errors.As(err, &apiErr)
			line.Error = &ErrorBody{Error: err.Error(), Code: apiErr.Code}
			if !known(info) {
				line.Result = nil
			}
		}
		enc.Encode(line)
	})
}

func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &APIError{Status: http.StatusBadRequest, Code: CodeBadRequest, Err: fmt.Errorf("request body: %w", err)}
	}
	return nil
}

func writeError(w http.ResponseWriter, logger *slog.Logger, err error) {
	apiErr := &APIError{Status: http.StatusInternalServerError, Code: CodeInternal, Err: err}
	errors.As(err, &apiErr)
	if apiErr.Status >= 500 {
		logger.Error("control API request failed", "err", err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(apiErr.Status)
	json.NewEncoder(w).Encode(ErrorBody{Error: err.Error(), Code: apiErr.Code})
}

type peerUIDKey struct{}

// PeerContext is an http.Server's ConnContext for the control socket: it
// records the calling process's uid (SO_PEERCRED), which the handler logs
// with every call that may change something.
func PeerContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if err != nil || cred == nil {
		return ctx
	}
	return context.WithValue(ctx, peerUIDKey{}, cred.Uid)
}

// ErrSocketInUse: another live daemon answers on the socket path.
var ErrSocketInUse = errors.New("another droverd is listening on the control socket")

// Listen binds the control socket at path. A live socket (another daemon
// answers) is an error; a stale file is removed. The socket is 0660 and
// owned by group when that group exists, else 0600: never world-writable.
// Closing the listener does not remove the socket file; Remove does.
// The socket's directory must belong to this user (or root) and be
// writable by nobody else: whoever can write it can replace the socket
// and receive what the next droverctl sends (a join token).
func Listen(path, group string) (*Socket, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if err := checkSocketDir(dir); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(path); err == nil {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %w", path, ErrSocketInUse)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	// Bind in a private directory, set owner and mode, then move into
	// place: the socket is never reachable with looser permissions.
	tmpDir, err := os.MkdirTemp(filepath.Dir(path), ".drover-sock-")
	if err != nil {
		return nil, fmt.Errorf("binding %s: %w", path, err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	ln, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("binding %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	fail := func(err error) (*Socket, error) {
		ln.Close()
		return nil, err
	}
	mode := os.FileMode(0o600)
	if g, err := user.LookupGroup(group); err == nil && group != "" {
		gid, _ := strconv.Atoi(g.Gid)
		if err := os.Chown(tmp, -1, gid); err != nil {
			return fail(fmt.Errorf("giving %s to group %s: %w", path, group, err))
		}
		mode = 0o660
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(fmt.Errorf("chmod %s: %w", path, err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("moving socket to %s: %w", path, err))
	}
	made, err := os.Lstat(path)
	if err != nil {
		return fail(fmt.Errorf("reading socket %s: %w", path, err))
	}
	return &Socket{Listener: ln, path: path, made: made}, nil
}

// Socket is the control socket droverd listens on.
type Socket struct {
	net.Listener
	path string
	made os.FileInfo
}

// Remove removes the socket file if it is still the one Listen made:
// never another daemon's, nor one somebody put in its place.
func (s *Socket) Remove() error {
	now, err := os.Lstat(s.path)
	if err != nil {
		return nil // gone already
	}
	if !os.SameFile(now, s.made) {
		return fmt.Errorf("%s is no longer the socket this daemon made: left in place", s.path)
	}
	return os.Remove(s.path)
}

// ErrLooseSocketDir: the control socket's directory may be written by
// other users.
var ErrLooseSocketDir = errors.New("control socket directory is writable by others")

// checkSocketDir refuses a directory that another user owns or that
// group or others may write.
func checkSocketDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("socket directory %s: cannot read its owner", dir)
	}
	if uid := uint32(os.Geteuid()); st.Uid != uid && st.Uid != 0 {
		return fmt.Errorf("socket directory %s belongs to uid %d, not to this user (%d) or root: %w", dir, st.Uid, uid, ErrLooseSocketDir)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("socket directory %s has mode %o: group or others may replace the socket (chmod go-w it, or choose another --socket): %w",
			dir, fi.Mode().Perm(), ErrLooseSocketDir)
	}
	return nil
}
