package peer

import (
	"bytes"
	"io"
)

// Error is a sentinel with a stable code. A handler returns it (wrapped
// with context as it likes); the caller's errors.Is matches the same
// sentinel on the error that crossed the mesh.
type Error struct {
	Code string
	Msg  string
}

// NewError makes a sentinel; codes are part of the wire format: never
// renamed, never reused.
func NewError(code, msg string) *Error { return &Error{Code: code, Msg: msg} }

func (e *Error) Error() string { return e.Msg }

// Errors every route may answer.
var (
	// ErrBadRequest: the request did not decode.
	ErrBadRequest = NewError("bad_request", "malformed request")
	// ErrNotInCluster: the callee is in no cluster (any more).
	ErrNotInCluster = NewError("not_in_cluster", "this machine is in no cluster")
)

// RemoteError is an error another machine answered.
type RemoteError struct {
	Machine string // the callee's id
	Code    string // "" when the callee's error had none
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// Is matches the sentinel of the same code.
func (e *RemoteError) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && e.Code != "" && t.Code == e.Code
}

// CodeOf is the code of the first sentinel (or remote error with a code)
// in err's chain; "" when there is none. A handler that passes on the
// error of a machine it called passes its code on too.
func CodeOf(err error) string {
	switch e := err.(type) {
	case nil:
		return ""
	case *Error:
		return e.Code
	case *RemoteError:
		if e.Code != "" {
			return e.Code
		}
	}
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		return CodeOf(u.Unwrap())
	case interface{ Unwrap() []error }:
		for _, e := range u.Unwrap() {
			if c := CodeOf(e); c != "" {
				return c
			}
		}
	}
	return ""
}

// WireError is an error as it crosses machines.
type WireError struct {
	Message string `json:"error"`
	Code    string `json:"code,omitempty"`
}

// Wire gives err's wire form; nil for nil.
func Wire(err error) *WireError {
	if err == nil {
		return nil
	}
	return &WireError{Message: err.Error(), Code: CodeOf(err)}
}

// Err is the error that machine answered.
func (w *WireError) Err(machine string) error {
	if w == nil {
		return nil
	}
	return &RemoteError{Machine: machine, Code: w.Code, Message: w.Message}
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

func stringsReader(s string) io.Reader { return bytes.NewReader([]byte(s)) }
