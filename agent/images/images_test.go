package images

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/internal/facttest"
)

// fakeEngine holds images as name -> content; a save gives the content.
type fakeEngine struct {
	mu     sync.Mutex
	images map[string]string
}

func (e *fakeEngine) HasImage(_ context.Context, image string) (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.images[image]
	return ok, nil
}

func (e *fakeEngine) EnsureImage(_ context.Context, image string, progress func(runtime.PullProgress)) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.images[image]; ok {
		return nil
	}
	if !strings.HasPrefix(image, "reg/") {
		return errors.New("image pull failed: " + image + ": manifest unknown")
	}
	progress(runtime.PullProgress{Layer: "l1", Status: "Downloading", Current: 1, Total: 2})
	progress(runtime.PullProgress{Layer: "l1", Status: "Pull complete"})
	e.images[image] = "pulled " + image
	return nil
}

func (e *fakeEngine) SaveImage(_ context.Context, image string) (io.ReadCloser, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return io.NopCloser(strings.NewReader(e.images[image])), nil
}

func (e *fakeEngine) LoadImage(_ context.Context, image string, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.images[image] = string(b)
	return nil
}

func TestPushLoadsTheImageIntoEachTarget(t *testing.T) {
	net := peertest.New(t)
	facts := facttest.NewStore()
	engines := map[string]*fakeEngine{}
	pushers := map[string]*Pusher{}
	hosts := map[string]*peertest.Host{}
	for _, id := range []string{"a", "b", "c"} {
		facts.AddMachine(t, id, id)
		h := net.Add(id)
		hosts[id] = h
		engines[id] = &fakeEngine{images: map[string]string{}}
		pushers[id] = New(id, engines[id], facts, h, slog.New(slog.NewTextHandler(io.Discard, nil)))
		pushers[id].Register(peer.Server{Mux: h, IDs: h})
	}
	engines["a"].images["app:1"] = "the bits of app:1"
	ctx := context.Background()

	res, err := pushers["a"].Push(ctx, ctlapi.ImagePushRequest{Image: "app:1", All: true})
	if err != nil || len(res.Machines) != 2 {
		t.Fatalf("push to all: %+v %v", res, err)
	}
	for _, id := range []string{"b", "c"} {
		if engines[id].images["app:1"] != "the bits of app:1" {
			t.Fatalf("%s has %q", id, engines[id].images["app:1"])
		}
	}
	for _, c := range []struct {
		name string
		req  ctlapi.ImagePushRequest
		code string
	}{
		{"an image it lacks", ctlapi.ImagePushRequest{Image: "nope:1", All: true}, ctlapi.CodeBadImage},
		{"itself", ctlapi.ImagePushRequest{Image: "app:1", To: []string{"a"}}, ctlapi.CodeSelf},
		{"both --to and --all", ctlapi.ImagePushRequest{Image: "app:1", To: []string{"b"}, All: true}, ctlapi.CodeBadRequest},
		{"neither", ctlapi.ImagePushRequest{Image: "app:1"}, ctlapi.CodeBadRequest},
	} {
		_, err := pushers["a"].Push(ctx, c.req)
		var apiErr *ctlapi.APIError
		if !errors.As(err, &apiErr) || apiErr.Code != c.code {
			t.Errorf("%s: %v, want %s", c.name, err, c.code)
		}
	}

	// A process that is no member cannot load anything.
	req, _ := http.NewRequest(http.MethodPost, hosts["b"].URL(routeLoad.Path), strings.NewReader("evil bits"))
	req.Header.Set(peer.RequestHeader, `{"image":"app:1"}`)
	resp, err := net.Raw().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK || !strings.Contains(string(body), `"code":"push_refused"`) || engines["b"].images["app:1"] != "the bits of app:1" {
		t.Fatalf("a non-member's push: status %d %s, b has %q", resp.StatusCode, body, engines["b"].images["app:1"])
	}
}

// A pull on another machine passes its engine's progress back; a failed
// pull keeps its cause.
func TestPullOnAnotherMachineReportsProgress(t *testing.T) {
	net := peertest.New(t)
	facts := facttest.NewStore()
	var pushers []*Pusher
	var engines []*fakeEngine
	for _, id := range []string{"a", "b"} {
		facts.AddMachine(t, id, id)
		h := net.Add(id)
		e := &fakeEngine{images: map[string]string{}}
		p := New(id, e, facts, h, slog.New(slog.NewTextHandler(io.Discard, nil)))
		p.Register(peer.Server{Mux: h, IDs: h})
		pushers, engines = append(pushers, p), append(engines, e)
	}
	var seen []string
	if err := pushers[0].Pull(context.Background(), "b", "reg/app:1", func(pp runtime.PullProgress) { seen = append(seen, pp.Status) }); err != nil {
		t.Fatal(err)
	}
	if engines[1].images["reg/app:1"] == "" || len(seen) == 0 || seen[len(seen)-1] != "Pull complete" {
		t.Fatalf("b has %v; progress seen %v", engines[1].images, seen)
	}
	err := pushers[0].Pull(context.Background(), "b", "other/app:1", func(runtime.PullProgress) {})
	if err == nil || !strings.Contains(err.Error(), "manifest unknown") {
		t.Fatalf("a failed pull: %v", err)
	}
}
