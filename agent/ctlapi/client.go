package ctlapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"
)

// Client talks to the local droverd. The CLI and the tests use it alike.
type Client struct {
	// SocketPath is the control socket; DefaultSocketPath() when empty.
	SocketPath string
	// Dial, when set, replaces dialing the unix socket.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	once sync.Once
	http *http.Client
}

// DefaultSocketPath is $DROVER_SOCKET, else DefaultSocket.
func DefaultSocketPath() string {
	if p := os.Getenv("DROVER_SOCKET"); p != "" {
		return p
	}
	return DefaultSocket
}

func (c *Client) socket() string {
	if c.SocketPath != "" {
		return c.SocketPath
	}
	return DefaultSocketPath()
}

func (c *Client) client() *http.Client {
	c.once.Do(func() {
		dial := c.Dial
		if dial == nil {
			dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", c.socket())
			}
		}
		c.http = &http.Client{Transport: &http.Transport{DialContext: dial}}
	})
	return c.http
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading droverd's answer: %w", err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("decoding droverd's answer to %s: %w", path, err)
	}
	return nil
}

// send makes one request and returns a 2xx answer for the caller to read
// and close; anything else becomes an error: the daemon not running, a
// version mismatch, or the daemon's own *APIError.
func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://droverd"+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set(VersionHeader, APIVersion)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.client().Do(req)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w (nothing listens on %s)", ErrDaemonNotRunning, c.socket())
		}
		return nil, fmt.Errorf("talking to droverd on %s: %w", c.socket(), err)
	}
	if v := resp.Header.Get(VersionHeader); v != "" && v != APIVersion {
		resp.Body.Close()
		return nil, versionMismatch(APIVersion, v)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		if err != nil {
			return nil, fmt.Errorf("reading droverd's answer: %w", err)
		}
		var eb ErrorBody
		if json.Unmarshal(raw, &eb) != nil || eb.Error == "" {
			eb.Error = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(raw))
		}
		return nil, &APIError{Status: resp.StatusCode, Code: eb.Code, Err: errors.New(eb.Error)}
	}
	return resp, nil
}

// Version asks the daemon for its version.
func (c *Client) Version(ctx context.Context) (VersionInfo, error) {
	var v VersionInfo
	return v, c.do(ctx, http.MethodGet, "/v1/version", nil, &v)
}

// Status asks for the cluster status.
func (c *Client) Status(ctx context.Context) (ClusterStatus, error) {
	var v ClusterStatus
	return v, c.do(ctx, http.MethodGet, "/v1/status", nil, &v)
}

// Machines lists the machines.
func (c *Client) Machines(ctx context.Context) ([]Machine, error) {
	var v []Machine
	return v, c.do(ctx, http.MethodGet, "/v1/machines", nil, &v)
}

// Init starts a new cluster on this machine.
func (c *Client) Init(ctx context.Context) (ClusterStatus, error) {
	var v ClusterStatus
	return v, c.do(ctx, http.MethodPost, "/v1/cluster/init", nil, &v)
}

// JoinToken gets a token for another machine to join with.
func (c *Client) JoinToken(ctx context.Context, req JoinTokenRequest) (JoinToken, error) {
	var v JoinToken
	return v, c.do(ctx, http.MethodPost, "/v1/cluster/join-token", req, &v)
}

// RotateKey replaces the cluster's gossip key on every machine.
func (c *Client) RotateKey(ctx context.Context) (KeyRotation, error) {
	var v KeyRotation
	return v, c.do(ctx, http.MethodPost, "/v1/cluster/rotate-key", struct{}{}, &v)
}

// Join joins the cluster named by a token.
func (c *Client) Join(ctx context.Context, req JoinRequest) (ClusterStatus, error) {
	var v ClusterStatus
	return v, c.do(ctx, http.MethodPost, "/v1/cluster/join", req, &v)
}

// Probe commits no-op entries through the fact store and times them.
func (c *Client) Probe(ctx context.Context, req ProbeRequest) (ProbeResult, error) {
	var v ProbeResult
	return v, c.do(ctx, http.MethodPost, "/v1/cluster/probe", req, &v)
}

// Mesh reads this machine's WireGuard device.
func (c *Client) Mesh(ctx context.Context) (MeshStatus, error) {
	var v MeshStatus
	return v, c.do(ctx, http.MethodGet, "/v1/mesh", nil, &v)
}

// Activate marks a machine active ("self" is this machine).
func (c *Client) Activate(ctx context.Context, machine string) (Machine, error) {
	var v Machine
	return v, c.do(ctx, http.MethodPost, "/v1/machines/"+url.PathEscape(machine)+"/activate", nil, &v)
}

// DeployPreview asks what a manifest would change.
func (c *Client) DeployPreview(ctx context.Context, req DeployRequest) (DeployPlan, error) {
	var v DeployPlan
	return v, c.do(ctx, http.MethodPost, "/v1/deploy/preview", req, &v)
}

// Deploy applies a manifest and waits until its services are ready.
func (c *Client) Deploy(ctx context.Context, req DeployRequest, onEvent func(DeployEvent)) (DeployResult, error) {
	return stream[DeployEvent, DeployResult](ctx, c, "/v1/deploy", req, "deploy", onEvent)
}

// Services lists the services.
func (c *Client) Services(ctx context.Context) ([]Service, error) {
	var v []Service
	return v, c.do(ctx, http.MethodGet, "/v1/services", nil, &v)
}

// ServiceLogs passes a service's log lines to onLine; with req.Follow
// until ctx ends.
func (c *Client) ServiceLogs(ctx context.Context, req LogsRequest, onLine func(LogLine)) (LogsResult, error) {
	return stream[LogLine, LogsResult](ctx, c, "/v1/services/logs", req, "logs", onLine)
}

// RemoveNamespace removes every service of a namespace; volumes stay.
func (c *Client) RemoveNamespace(ctx context.Context, namespace string, req RemoveRequest) (RemoveResult, error) {
	var v RemoveResult
	return v, c.do(ctx, http.MethodPost, "/v1/namespaces/"+url.PathEscape(namespace)+"/remove", req, &v)
}

// RestartService restarts a service's container where it runs and
// returns once it is ready again.
func (c *Client) RestartService(ctx context.Context, service string) (RestartResult, error) {
	ns, name, ok := strings.Cut(service, "/")
	if !ok {
		return RestartResult{}, fmt.Errorf("service %q: want namespace/name", service)
	}
	var v RestartResult
	return v, c.do(ctx, http.MethodPost, "/v1/services/"+url.PathEscape(ns)+"/"+url.PathEscape(name)+"/restart", struct{}{}, &v)
}

// Failover fails a service over to its standby and waits until it is
// ready there.
func (c *Client) Failover(ctx context.Context, req FailoverRequest) (FailoverResult, error) {
	var v FailoverResult
	return v, c.do(ctx, http.MethodPost, "/v1/services/failover", req, &v)
}

// SetSecret seals a secret's value in the facts.
func (c *Client) SetSecret(ctx context.Context, req SecretRequest) (SecretInfo, error) {
	var v SecretInfo
	return v, c.do(ctx, http.MethodPost, "/v1/secrets/set", req, &v)
}

// Secrets lists the secrets (never their values).
func (c *Client) Secrets(ctx context.Context) ([]SecretInfo, error) {
	var v []SecretInfo
	return v, c.do(ctx, http.MethodGet, "/v1/secrets", nil, &v)
}

// RemoveSecret forgets a secret no service uses.
func (c *Client) RemoveSecret(ctx context.Context, secret string) error {
	ns, name, ok := strings.Cut(secret, "/")
	if !ok {
		return fmt.Errorf("secret %q: want namespace/name", secret)
	}
	var v struct{}
	return c.do(ctx, http.MethodPost, "/v1/secrets/"+url.PathEscape(ns)+"/"+url.PathEscape(name)+"/remove", struct{}{}, &v)
}

// Events passes the events this machine kept to onEvent; with
// req.Follow the ones to come too, until ctx ends.
func (c *Client) Events(ctx context.Context, req EventsRequest, onEvent func(Event)) (EventsEnd, error) {
	return stream[Event, EventsEnd](ctx, c, "/v1/events", req, "events", onEvent)
}

// View says whether this machine's facts may be stale.
func (c *Client) View(ctx context.Context) (ViewStatus, error) {
	var v ViewStatus
	return v, c.do(ctx, http.MethodGet, "/v1/view", nil, &v)
}

// Volumes lists the volumes.
func (c *Client) Volumes(ctx context.Context) ([]Volume, error) {
	var v []Volume
	return v, c.do(ctx, http.MethodGet, "/v1/volumes", nil, &v)
}

// Migrate moves a service and waits until the move is done or undone,
// calling onEvent for each event on the way (nil: ignore them).
func (c *Client) Migrate(ctx context.Context, req MigrateRequest, onEvent func(MigrationEvent)) (MigrationInfo, error) {
	return stream[MigrationEvent, MigrationInfo](ctx, c, "/v1/migrate", req, "migration", onEvent)
}

// Rollback moves a done migration's service back to its source, sending
// only what changed since the copy the source kept.
func (c *Client) Rollback(ctx context.Context, id string, onEvent func(MigrationEvent)) (MigrationInfo, error) {
	return stream[MigrationEvent, MigrationInfo](ctx, c, "/v1/migrations/"+url.PathEscape(id)+"/rollback", struct{}{}, "rollback", onEvent)
}

// Drain starts the drain of a machine ("self" is this machine), or
// follows the one that runs; with req.Wait it returns when the drain ends.
func (c *Client) Drain(ctx context.Context, req DrainRequest, onEvent func(DrainEvent)) (DrainInfo, error) {
	return stream[DrainEvent, DrainInfo](ctx, c, "/v1/machines/"+url.PathEscape(req.Machine)+"/drain", req, "drain", onEvent)
}

// DrainStatus gives a machine's latest drain.
func (c *Client) DrainStatus(ctx context.Context, machine string) (DrainInfo, error) {
	var v DrainInfo
	return v, c.do(ctx, http.MethodGet, "/v1/machines/"+url.PathEscape(machine)+"/drain", nil, &v)
}

// RemoveMachine removes a drained or dead machine from the cluster.
func (c *Client) RemoveMachine(ctx context.Context, req RemoveMachineRequest) (RemovedMachine, error) {
	var v RemovedMachine
	return v, c.do(ctx, http.MethodPost, "/v1/machines/"+url.PathEscape(req.Machine)+"/remove", req, &v)
}

// Migration describes one migration.
func (c *Client) Migration(ctx context.Context, id string) (MigrationInfo, error) {
	var v MigrationInfo
	return v, c.do(ctx, http.MethodGet, "/v1/migrations/"+url.PathEscape(id), nil, &v)
}

// AbortMigration asks the daemon running a migration to abort it; refused
// after the commit.
func (c *Client) AbortMigration(ctx context.Context, id string) (MigrationInfo, error) {
	var v MigrationInfo
	return v, c.do(ctx, http.MethodPost, "/v1/migrations/"+url.PathEscape(id)+"/abort", nil, &v)
}

// PurgeSource destroys the copy a done migration left on its source.
func (c *Client) PurgeSource(ctx context.Context, id string) (MigrationInfo, error) {
	var v MigrationInfo
	return v, c.do(ctx, http.MethodPost, "/v1/migrations/"+url.PathEscape(id)+"/purge-source", nil, &v)
}

// RenderManifest gives the manifest a migration would deploy.
func (c *Client) RenderManifest(ctx context.Context, req MigrateRequest) (RenderedManifest, error) {
	var v RenderedManifest
	return v, c.do(ctx, http.MethodPost, "/v1/migrate/render-manifest", req, &v)
}

// stream posts in and reads the JSON lines of a migration's answer.
// stream posts a long request and reads its NDJSON answer: events to
// onEvent, then the result or the error. what names the request in the
// error of an answer cut short.
func stream[E, R any](ctx context.Context, c *Client, path string, in any, what string, onEvent func(E)) (R, error) {
	var zero R
	resp, err := c.send(ctx, http.MethodPost, path, in)
	if err != nil {
		return zero, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var line StreamLine[E, R]
		if err := dec.Decode(&line); err != nil {
			return zero, fmt.Errorf("%w: the daemon's answer ended before the %s did: %w", ErrStreamCut, what, err)
		}
		switch {
		case line.Event != nil:
			if onEvent != nil {
				onEvent(*line.Event)
			}
		case line.Error != nil:
			var info R
			if line.Result != nil {
				info = *line.Result
			}
			return info, &APIError{Status: http.StatusConflict, Code: line.Error.Code, Err: errors.New(line.Error.Error)}
		case line.Result != nil:
			return *line.Result, nil
		}
	}
}

// Migrations lists the migrations.
func (c *Client) Migrations(ctx context.Context) ([]MigrationInfo, error) {
	var v []MigrationInfo
	return v, c.do(ctx, http.MethodGet, "/v1/migrations", nil, &v)
}

// MigratePreview asks what a migration would do and whether it can.
func (c *Client) MigratePreview(ctx context.Context, req MigrateRequest) (MigrationPlan, error) {
	var v MigrationPlan
	return v, c.do(ctx, http.MethodPost, "/v1/migrate/preview", req, &v)
}

// PushImage puts an image of the local engine on other machines.
func (c *Client) PushImage(ctx context.Context, req ImagePushRequest) (ImagePushResult, error) {
	var v ImagePushResult
	return v, c.do(ctx, http.MethodPost, "/v1/images/push", req, &v)
}
