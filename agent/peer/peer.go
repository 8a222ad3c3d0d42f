// Package peer is the typed form of daemon-to-daemon calls: each part of
// the agent declares its routes here as values with a request and an
// answer type, registers a handler for each, and calls them with one
// function per route. Errors cross machines with a stable code, so the
// caller matches them with errors.Is against the same sentinel the
// callee returned.
package peer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
)

// Caller reaches the daemon of another machine (cluster.Node does): the
// answer's body is the caller's to close; a status other than 200 is an
// error that carries the body (see StatusError).
type Caller interface {
	CallRPC(ctx context.Context, machineID, method, path string, header http.Header, body io.Reader) (*http.Response, error)
}

// StatusError is what a Caller returns for an answer other than 200: the
// status and the first bytes of the body.
type StatusError interface {
	error
	StatusCode() int
	Body() []byte
}

// Mux registers the handlers of this machine (cluster.Node does).
type Mux interface {
	HandleRPC(pattern string, h http.HandlerFunc)
}

// Identifier names the machine a request came from (cluster.Node does:
// by the overlay address WireGuard authenticated, or itself for its calls
// to itself).
type Identifier interface {
	CallerOf(r *http.Request) (string, bool)
}

// Server is this machine's side: where handlers are registered and how a
// caller is named.
type Server struct {
	Mux Mux
	IDs Identifier
}

// maxRequest bounds a JSON request.
const maxRequest = 1 << 20

// from names the calling machine, "" when it is none known.
func (s Server) from(r *http.Request) string {
	id, _ := s.IDs.CallerOf(r)
	return id
}

type callerKey struct{}

// withCaller lets a handler name its caller again later (From).
func (s Server) withCaller(r *http.Request) context.Context {
	return context.WithValue(r.Context(), callerKey{}, func() string { return s.from(r) })
}

// From names the machine a handler's request comes from, as this
// machine's facts know it now: a handler that first waits until its facts
// have caught up asks here rather than trusting its from argument, which
// was read when the request came in.
func From(ctx context.Context) string {
	if f, ok := ctx.Value(callerKey{}).(func() string); ok {
		return f()
	}
	return ""
}

// Route is a call with a JSON request and a JSON answer.
type Route[Req, Resp any] struct{ Path string }

// Handle serves rt on s with h; from is the calling machine's id.
func Handle[Req, Resp any](s Server, rt Route[Req, Resp], h func(ctx context.Context, from string, req Req) (Resp, error)) {
	s.Mux.HandleRPC("POST "+rt.Path, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decodeStrict(io.LimitReader(r.Body, maxRequest), &req); err != nil {
			writeError(w, fmt.Errorf("%s: request: %w: %v", rt.Path, ErrBadRequest, err))
			return
		}
		resp, err := h(s.withCaller(r), s.from(r), req)
		answer(w, resp, err)
	})
}

// answer writes a handler's JSON answer, or its error.
func answer(w http.ResponseWriter, resp any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(resp)
}

// Call sends req to machine and decodes its answer.
func (rt Route[Req, Resp]) Call(ctx context.Context, c Caller, machine string, req Req) (Resp, error) {
	resp, err := post(ctx, c, machine, rt.Path, req)
	if err != nil {
		var zero Resp
		return zero, err
	}
	return decodeAnswer[Resp](resp, rt.Path, machine)
}

// post sends req as JSON to machine's handler of path.
func post(ctx context.Context, c Caller, machine, path string, req any) (*http.Response, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("%s: encoding the request: %w", path, err)
	}
	resp, err := c.CallRPC(ctx, machine, http.MethodPost, path, nil, bytesReader(body))
	if err != nil {
		return nil, remoteError(path, machine, err)
	}
	return resp, nil
}

// decodeAnswer reads and closes a JSON answer.
func decodeAnswer[Resp any](resp *http.Response, path, machine string) (Resp, error) {
	defer resp.Body.Close()
	var out Resp
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return out, fmt.Errorf("%s on %s: decoding the answer: %w", path, machine, err)
	}
	return out, nil
}

func decodeStrict(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func writeError(w http.ResponseWriter, err error) {
	status := http.StatusConflict
	if errors.Is(err, ErrBadRequest) {
		status = http.StatusBadRequest
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(Wire(err))
}

// remoteError turns a failed call into the callee's own error when it
// answered one, else wraps the transport's.
func remoteError(path, machine string, err error) error {
	var se StatusError
	if errors.As(err, &se) {
		var we WireError
		if json.Unmarshal(se.Body(), &we) == nil && we.Message != "" {
			return fmt.Errorf("%s: %w", path, we.Err(machine))
		}
	}
	return fmt.Errorf("%s on %s: %w", path, machine, err)
}
