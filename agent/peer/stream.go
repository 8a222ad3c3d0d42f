package peer

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"
)

// Stream is a call whose answer is a line of progress every so often,
// then the result or the error, as JSON lines: a long call (a volume
// stream) shows it is alive and how far it got.
type Stream[Req, Line, Result any] struct{ Path string }

// frame is one line of a Stream's answer.
type frame[Line, Result any] struct {
	Line   *Line      `json:"line,omitempty"`
	Result *Result    `json:"result,omitempty"`
	Error  *WireError `json:"error,omitempty"`
}

// HandleStream serves rt on s. h calls emit for each progress line (never
// concurrently) and returns the result. The answer's status is sent before
// h runs, so the caller's idle timer starts at once.
func HandleStream[Req, Line, Result any](s Server, rt Stream[Req, Line, Result], h func(ctx context.Context, from string, req Req, emit func(Line)) (Result, error)) {
	s.Mux.HandleRPC("POST "+rt.Path, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decodeStrict(io.LimitReader(r.Body, maxRequest), &req); err != nil {
			writeError(w, fmt.Errorf("%s: request: %w: %v", rt.Path, ErrBadRequest, err))
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		rc.Flush()
		enc := json.NewEncoder(w)
		emit := func(l Line) {
			enc.Encode(frame[Line, Result]{Line: &l}) // a caller gone is seen by h through ctx
			rc.Flush()
		}
		res, err := h(s.withCaller(r), s.from(r), req, emit)
		last := frame[Line, Result]{Error: Wire(err)}
		if err == nil {
			last.Result = &res
		}
		enc.Encode(last)
	})
}

// Call sends req to machine, passes each progress line to onLine, and
// gives the result or the callee's error.
func (rt Stream[Req, Line, Result]) Call(ctx context.Context, c Caller, machine string, req Req, onLine func(Line)) (Result, error) {
	var zero Result
	resp, err := post(ctx, c, machine, rt.Path, req)
	if err != nil {
		return zero, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var f frame[Line, Result]
		if err := dec.Decode(&f); err != nil {
			return zero, fmt.Errorf("%s on %s: reading the answer: %w", rt.Path, machine, err)
		}
		switch {
		case f.Error != nil:
			return zero, f.Error.Err(machine)
		case f.Result != nil:
			return *f.Result, nil
		case f.Line != nil:
			onLine(*f.Line)
		}
	}
}

// RequestHeader carries an Upload's request, since its body is the data.
const RequestHeader = "Drover-Peer-Request"

// Upload is a call whose request body is a byte stream (a volume), with
// a small JSON request in RequestHeader and a JSON answer.
type Upload[Req, Resp any] struct{ Path string }

// Body is an Upload's data as its handler reads it: the deadline of the
// next read can be pushed forward, so a stream that stops fails instead
// of hanging.
type Body interface {
	io.Reader
	SetReadDeadline(time.Time) error
}

type uploadBody struct {
	io.Reader
	rc *http.ResponseController
}

func (b uploadBody) SetReadDeadline(t time.Time) error { return b.rc.SetReadDeadline(t) }

// HandleUpload serves rt on s.
func HandleUpload[Req, Resp any](s Server, rt Upload[Req, Resp], h func(ctx context.Context, from string, req Req, body Body) (Resp, error)) {
	s.Mux.HandleRPC("POST "+rt.Path, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decodeStrict(io.LimitReader(stringsReader(r.Header.Get(RequestHeader)), maxRequest), &req); err != nil {
			writeError(w, fmt.Errorf("%s: request header: %w: %v", rt.Path, ErrBadRequest, err))
			return
		}
		resp, err := h(s.withCaller(r), s.from(r), req, uploadBody{Reader: r.Body, rc: http.NewResponseController(w)})
		answer(w, resp, err)
	})
}

// Call streams body to machine with req and decodes the answer.
func (rt Upload[Req, Resp]) Call(ctx context.Context, c Caller, machine string, req Req, body io.Reader) (Resp, error) {
	var out Resp
	raw, err := json.Marshal(req)
	if err != nil {
		return out, fmt.Errorf("%s: encoding the request: %w", rt.Path, err)
	}
	resp, err := c.CallRPC(ctx, machine, http.MethodPost, rt.Path, http.Header{RequestHeader: {string(raw)}}, body)
	if err != nil {
		return out, remoteError(rt.Path, machine, err)
	}
	return decodeAnswer[Resp](resp, rt.Path, machine)
}
