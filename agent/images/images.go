// Package images puts images on other machines' engines over the mesh,
// for operators without a registry: `droverctl image push IMAGE --to
// MACHINE|--all` saves the image from this machine's engine and loads it
// into each target's.
package images

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/internal/iocount"
)

// routeLoad loads an image into the callee's engine under a name.
var routeLoad = peer.Upload[loadRequest, loadResult]{Path: "images/v1/load"}

// routePull has the callee's engine pull an image it lacks, answering
// with the engine's progress.
var routePull = peer.Stream[pullRequest, runtime.PullProgress, pullResult]{Path: "images/v1/pull"}

type pullRequest struct {
	Image string `json:"image"`
}

type pullResult struct{}

type loadRequest struct {
	Image string `json:"image"`
}

type loadResult struct{}

// errNotMember: a push from a caller the facts do not name.
var errNotMember = peer.NewError("push_refused", "only a member of the cluster may push an image here")

// Engine is this machine's Docker engine as pushing needs it.
type Engine interface {
	HasImage(ctx context.Context, image string) (bool, error)
	EnsureImage(ctx context.Context, image string, progress func(runtime.PullProgress)) error
	SaveImage(ctx context.Context, image string) (io.ReadCloser, error)
	LoadImage(ctx context.Context, image string, r io.Reader) error
}

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
}

// Pusher pushes images to other machines and loads the ones pushed here.
type Pusher struct {
	self   string
	engine Engine
	facts  Facts
	peers  peer.Caller
	logger *slog.Logger
}

// New makes a pusher for machine self.
func New(self string, engine Engine, facts Facts, peers peer.Caller, logger *slog.Logger) *Pusher {
	return &Pusher{self: self, engine: engine, facts: facts, peers: peers, logger: logger}
}

// Register serves the loading side on s.
func (p *Pusher) Register(s peer.Server) {
	peer.HandleUpload(s, routeLoad, p.handleLoad)
	peer.HandleStream(s, routePull, p.handlePull)
}

func (p *Pusher) handlePull(ctx context.Context, from string, req pullRequest, emit func(runtime.PullProgress)) (pullResult, error) {
	if from == "" {
		return pullResult{}, errNotMember
	}
	return pullResult{}, p.engine.EnsureImage(ctx, req.Image, runtime.ThrottleProgress(emit))
}

// Pull has machine's engine get image from its registry if it lacks it,
// passing the engine's progress to onProgress (runtime.ThrottleProgress).
func (p *Pusher) Pull(ctx context.Context, machineID, image string, onProgress func(runtime.PullProgress)) error {
	if machineID == p.self {
		return p.engine.EnsureImage(ctx, image, runtime.ThrottleProgress(onProgress))
	}
	_, err := routePull.Call(ctx, p.peers, machineID, pullRequest{Image: image}, onProgress)
	return err
}

func (p *Pusher) handleLoad(ctx context.Context, from string, req loadRequest, body peer.Body) (loadResult, error) {
	if from == "" {
		return loadResult{}, errNotMember
	}
	if err := p.engine.LoadImage(ctx, req.Image, body); err != nil {
		return loadResult{}, err
	}
	p.logger.Info("loaded an image pushed by another machine", "image", req.Image, "from", from)
	return loadResult{}, nil
}

// Push sends an image of this machine's engine to the named machines, or
// to every other active machine with all.
func (p *Pusher) Push(ctx context.Context, req ctlapi.ImagePushRequest) (ctlapi.ImagePushResult, error) {
	out := ctlapi.ImagePushResult{Image: req.Image}
	if has, err := p.engine.HasImage(ctx, req.Image); err != nil {
		return out, err
	} else if !has {
		return out, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeBadImage, Err: fmt.Errorf("image %s is not in this machine's engine", req.Image)}
	}
	targets, err := p.targets(req)
	if err != nil {
		return out, err
	}
	var failed []error
	for _, m := range targets {
		r := ctlapi.ImagePushed{Machine: m.Name}
		began := time.Now()
		n, err := p.pushTo(ctx, req.Image, m.ID)
		r.Bytes, r.Took = n, ctlapi.Duration(time.Since(began))
		if err != nil {
			r.Error = err.Error()
			failed = append(failed, fmt.Errorf("%s: %w", m.Name, err))
		}
		out.Machines = append(out.Machines, r)
	}
	if len(failed) > 0 {
		return out, &ctlapi.APIError{Status: http.StatusBadGateway, Code: ctlapi.CodeImagePushFailed,
			Err: fmt.Errorf("pushing %s: %w", req.Image, errors.Join(failed...))}
	}
	return out, nil
}

// targets are the machines a push goes to.
func (p *Pusher) targets(req ctlapi.ImagePushRequest) ([]fsm.Machine, error) {
	if req.All == (len(req.To) > 0) {
		return nil, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadRequest, Err: errors.New("name the machines to push to (--to) or push to all (--all), not both")}
	}
	var out []fsm.Machine
	if req.All {
		p.facts.Read(func(s *fsm.State) {
			for _, m := range s.Machines() {
				if m.ID != p.self && m.State != fsm.MachineGone {
					out = append(out, m)
				}
			}
		})
		return out, nil
	}
	for _, name := range req.To {
		m, err := factview.MachineByName(p.facts, p.self, name)
		if err != nil {
			return nil, err
		}
		if m.ID == p.self {
			return nil, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeSelf, Err: fmt.Errorf("%s is this machine: its engine has the image", name)}
		}
		out = append(out, m)
	}
	return out, nil
}

// pushTo streams the image into one machine's engine.
func (p *Pusher) pushTo(ctx context.Context, image, machineID string) (uint64, error) {
	saved, err := p.engine.SaveImage(ctx, image)
	if err != nil {
		return 0, err
	}
	defer saved.Close()
	counted := &iocount.Reader{R: saved}
	_, err = routeLoad.Call(ctx, p.peers, machineID, loadRequest{Image: image}, counted)
	return counted.N(), err
}
