package peer

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

type fuzzMux struct{ h http.HandlerFunc }

func (m *fuzzMux) HandleRPC(_ string, h http.HandlerFunc) { m.h = h }

type noCaller struct{}

func (noCaller) CallerOf(*http.Request) (string, bool) { return "", false }

type fuzzReq struct {
	ID     string   `json:"id"`
	Volume string   `json:"volume"`
	Names  []string `json:"names"`
	Size   uint64   `json:"size"`
}

// FuzzRequestDecoding sends arbitrary bodies and upload headers to a
// route's handler: it never panics, answers 400 with a bad_request code
// for what does not decode, and hands the handler only what does.
func FuzzRequestDecoding(f *testing.F) {
	f.Add([]byte(`{"id":"m1","volume":"data","names":["a"],"size":3}`))
	f.Add([]byte(`{"id":`))
	f.Add([]byte(`{"id":"m1","extra":1}`))
	f.Add([]byte(`[]`))
	f.Add([]byte("\x00\xff"))
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, kind := range []string{"route", "upload"} {
			mux := &fuzzMux{}
			s := Server{Mux: mux, IDs: noCaller{}}
			called := false
			switch kind {
			case "route":
				Handle(s, Route[fuzzReq, fuzzReq]{Path: "f"}, func(_ context.Context, _ string, r fuzzReq) (fuzzReq, error) {
					called = true
					return r, nil
				})
			case "upload":
				HandleUpload(s, Upload[fuzzReq, fuzzReq]{Path: "f"}, func(_ context.Context, _ string, r fuzzReq, _ Body) (fuzzReq, error) {
					called = true
					return r, nil
				})
			}
			req := httptest.NewRequest(http.MethodPost, "/f", strings.NewReader(string(body)))
			if kind == "upload" {
				req = httptest.NewRequest(http.MethodPost, "/f", strings.NewReader("data"))
				req.Header[RequestHeader] = []string{string(body)}
			}
			w := httptest.NewRecorder()
			mux.h(w, req)
			var probe fuzzReq
			dec := json.NewDecoder(strings.NewReader(string(body)))
			dec.DisallowUnknownFields()
			valid := dec.Decode(&probe) == nil
			switch {
			case called && w.Code != http.StatusOK:
				t.Fatalf("%s: handler called but answered %d", kind, w.Code)
			case !called && (w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), `"code":"bad_request"`)):
				t.Fatalf("%s: refused with %d %s", kind, w.Code, w.Body.String())
			case called && !valid:
				t.Fatalf("%s: handler called with %q, which does not decode", kind, body)
			}
		}
	})
}
