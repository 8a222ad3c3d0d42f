// Package servicelogs shows a service's log from any machine: the machine
// that runs it streams its container's log over the mesh, and a follower
// goes on with the next machine when the service moves, from the last
// line it passed on, so no line is lost or shown twice at the switch.
// See DESIGN.md.
package servicelogs

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
)

// routeLogs: the machine that has the service's container streams its log.
var routeLogs = peer.Stream[logsRequest, runtime.LogLine, logsEnd]{Path: "service/v1/logs"}

// logsRequest names a service and the lines wanted.
type logsRequest struct {
	Namespace string    `json:"namespace"`
	Service   string    `json:"service"`
	Since     time.Time `json:"since,omitzero"`
	Tail      int       `json:"tail,omitempty"`
	Follow    bool      `json:"follow,omitempty"`
}

// logsEnd ends a stream: the log ended (the container stopped, or the
// lines asked for were all sent).
type logsEnd struct{}

// maxFailures bounds the calls in a row that fail otherwise than by the
// machine having no container: about 15 s of a machine not answering.
const maxFailures = 60

// ErrNoContainer: the machine asked has no container of the service.
var ErrNoContainer = peer.NewError("logs_no_container", "no container of the service on this machine")

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
}

// Containers lists this machine's containers and reads their logs.
type Containers interface {
	List(ctx context.Context) ([]runtime.Container, error)
	Logs(ctx context.Context, id string, opts runtime.LogOptions, emit func(runtime.LogLine)) error
}

// Logs serves this machine's containers' logs and follows services'.
type Logs struct {
	facts      Facts
	gossip     factview.Gossip
	peers      peer.Caller
	containers Containers
	// retry is how long a follower waits before it asks again for a
	// log that ended (the service stopped, or is moving).
	retry time.Duration
}

// New makes the service logs of this machine.
func New(facts Facts, gossip factview.Gossip, peers peer.Caller, containers Containers) *Logs {
	return &Logs{facts: facts, gossip: gossip, peers: peers, containers: containers, retry: 250 * time.Millisecond}
}

// Register serves this machine's side on s; call it before s starts.
func (l *Logs) Register(s peer.Server) {
	peer.HandleStream(s, routeLogs, l.handleLogs)
}

// handleLogs streams the log of the service's container on this machine.
func (l *Logs) handleLogs(ctx context.Context, _ string, req logsRequest, emit func(runtime.LogLine)) (logsEnd, error) {
	cs, err := l.containers.List(ctx)
	if err != nil {
		return logsEnd{}, err
	}
	for _, c := range cs {
		if c.Namespace == req.Namespace && c.Service == req.Service {
			return logsEnd{}, l.containers.Logs(ctx, c.ID, runtime.LogOptions{Since: req.Since, Tail: req.Tail, Follow: req.Follow}, emit)
		}
	}
	return logsEnd{}, fmt.Errorf("%w: %s/%s", ErrNoContainer, req.Namespace, req.Service)
}

// Follow passes the service's log lines to emit. Without req.Follow it
// gives the lines there are and returns; with it, it goes on until ctx
// ends: when the log ends (the container stopped, or the service moved)
// it asks again, of whichever machine runs the service then, for the
// lines after the last one it passed on. It returns the number of lines.
func (l *Logs) Follow(ctx context.Context, req ctlapi.LogsRequest, emit func(ctlapi.LogLine)) (ctlapi.LogsResult, error) {
	ns, name, err := factview.SplitService(req.Service)
	if err != nil {
		return ctlapi.LogsResult{}, err
	}
	since, tail := req.Since, req.Tail
	var n, failures int
	for {
		owner, err := l.owner(ns, name)
		if err != nil {
			return ctlapi.LogsResult{Lines: n}, err
		}
		machine := factview.NameOf(l.gossip, l.facts, owner)
		_, err = routeLogs.Call(ctx, l.peers, owner, logsRequest{Namespace: ns, Service: name, Since: since, Tail: tail, Follow: req.Follow},
			func(line runtime.LogLine) {
				n++
				if !line.Time.IsZero() {
					since, tail = line.Time, 0
				}
				emit(ctlapi.LogLine{Time: line.Time, Machine: machine, Stream: line.Stream, Text: line.Text})
			})
		switch {
		case ctx.Err() != nil:
			return ctlapi.LogsResult{Lines: n}, nil
		case !req.Follow:
			if err != nil {
				return ctlapi.LogsResult{Lines: n}, fmt.Errorf("the log of %s on %s: %w", req.Service, machine, err)
			}
			return ctlapi.LogsResult{Lines: n}, nil
		case err == nil || errors.Is(err, ErrNoContainer):
			failures = 0
		default:
			// The machine does not answer (its daemon restarts, its link
			// is down): go on trying for a while.
			if failures++; failures >= maxFailures {
				return ctlapi.LogsResult{Lines: n}, fmt.Errorf("the log of %s on %s, after %d tries: %w", req.Service, machine, failures, err)
			}
		}
		// The log ended or its machine has no container now: the service
		// stopped, restarts, or moves. Ask again in a moment.
		select {
		case <-ctx.Done():
			return ctlapi.LogsResult{Lines: n}, nil
		case <-time.After(l.retry):
		}
	}
}

// owner is the machine that runs the service.
func (l *Logs) owner(ns, name string) (string, error) {
	var sv fsm.Service
	var ok bool
	l.facts.Read(func(s *fsm.State) { sv, ok = s.Service(ns, name) })
	if !ok {
		return "", &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService, Err: fmt.Errorf("no service %s/%s", ns, name)}
	}
	return sv.MachineID, nil
}
