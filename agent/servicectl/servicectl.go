// Package servicectl acts on a running service from any machine:
// `droverctl service restart NS/SVC`. The daemon asked takes the
// namespace's lock (a restart never runs beside a deploy or a move of the
// namespace), the machine that runs the service restarts its container
// and waits until it is ready again. See DESIGN.md.
package servicectl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/factview"
	"github.com/drover-sh/drover/internal/nslock"
	"github.com/drover-sh/drover/volume"
)

// routeRestart: the machine that runs the service restarts its container.
var routeRestart = peer.Route[restartRequest, restarted]{Path: "service/v1/restart"}

// routeDestroyVolume: a volume's owner destroys its dataset.
var routeDestroyVolume = peer.Route[destroyRequest, destroyed]{Path: "volume/v1/destroy"}

type destroyRequest struct {
	Namespace string `json:"namespace"`
	Volume    string `json:"volume"`
	Holder    string `json:"holder"` // of the namespace lock, checked by the owner
}

type destroyed struct{}

// Volumes destroys this machine's datasets (volume.ZFS).
type Volumes interface {
	Destroy(namespace, name string) error
}

type restartRequest struct {
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
	Holder    string `json:"holder"` // of the namespace lock, checked by the owner
}

type restarted struct {
	Took time.Duration `json:"took_ns"` // until ready again
}

// Errors the owner answers with.
var (
	ErrNotOwner       = peer.NewError("restart_not_owner", "this machine does not run the service")
	ErrNotLocked      = peer.NewError("restart_not_locked", "the restart does not hold the namespace's lock")
	ErrNoContainer    = peer.NewError("restart_no_container", "the service has no container here")
	ErrNotVolumeOwner = peer.NewError("volume_not_owner", "this machine does not own the volume")
	ErrVolumeInUse    = peer.NewError("volume_in_use", "a service mounts the volume")
)

// Facts is this machine's view of the fact store.
type Facts interface {
	Read(func(*fsm.State))
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
	// CaughtUp returns once this machine has the facts the leader had
	// when it was called: the caller's lock, just taken elsewhere.
	CaughtUp(ctx context.Context) error
}

// Runtime restarts a container and checks its readiness.
type Runtime interface {
	List(ctx context.Context) ([]runtime.Container, error)
	Stop(ctx context.Context, id string, grace time.Duration) (runtime.Stopped, error)
	Restart(ctx context.Context, id string) error
	WaitReady(ctx context.Context, c runtime.Container, r runtime.RunSpec) error
	// WriteSecrets refreshes the files of the service's secrets, which
	// the container reads from its next start.
	WriteSecrets(r runtime.RunSpec) error
}

// Config names this machine.
type Config struct {
	Self      string
	Name      string
	LockLease time.Duration
	Logger    *slog.Logger
}

// Services serves restarts.
type Services struct {
	cfg    Config
	facts  Facts
	gossip factview.Gossip
	peers  peer.Caller
	rt     Runtime
	vols   Volumes // nil: this machine holds no volumes

	mu         sync.Mutex
	restarting map[string]bool // services whose container this machine restarts now
}

// Busy tells whether this machine is restarting the service's container:
// the reconciler leaves it alone meanwhile (between the stop and the
// start it would look stopped by someone).
func (s *Services) Busy(service string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.restarting[service]
}

// New makes the service actions of this machine; vols is nil on a
// machine without volumes.
func New(cfg Config, facts Facts, gossip factview.Gossip, peers peer.Caller, rt Runtime, vols Volumes) *Services {
	return &Services{cfg: cfg, facts: facts, gossip: gossip, peers: peers, rt: rt, vols: vols, restarting: map[string]bool{}}
}

// Register serves this machine's side on s; call it before s starts.
func (s *Services) Register(srv peer.Server) {
	peer.Handle(srv, routeRestart, s.handleRestart)
	peer.Handle(srv, routeDestroyVolume, s.handleDestroyVolume)
}

// DestroyVolume has a volume's owner destroy its dataset; holder holds the
// namespace's lock. The volume's fact is the caller's to remove after.
func (s *Services) DestroyVolume(ctx context.Context, ns, name, holder string) error {
	var vol fsm.Volume
	var ok bool
	s.facts.Read(func(st *fsm.State) { vol, ok = st.Volume(ns, name) })
	if !ok {
		return fmt.Errorf("no volume %s/%s", ns, name)
	}
	_, err := routeDestroyVolume.Call(ctx, s.peers, vol.OwnerID, destroyRequest{Namespace: ns, Volume: name, Holder: holder})
	if err != nil {
		return fmt.Errorf("destroying volume %s/%s on %s: %w", ns, name, factview.NameOf(s.gossip, s.facts, vol.OwnerID), err)
	}
	return nil
}

// handleDestroyVolume (the volume's owner): destroy its dataset, when the
// caller holds the namespace's lock and no service mounts it.
func (s *Services) handleDestroyVolume(ctx context.Context, _ string, req destroyRequest) (destroyed, error) {
	if err := s.requireLock(ctx, req.Namespace, req.Holder); err != nil {
		return destroyed{}, err
	}
	var vol fsm.Volume
	var ok, mounted bool
	s.facts.Read(func(st *fsm.State) {
		vol, ok = st.Volume(req.Namespace, req.Volume)
		for _, sv := range st.Services() {
			for _, v := range sv.Spec.Volumes {
				mounted = mounted || (sv.Namespace == req.Namespace && v.Name == req.Volume)
			}
		}
	})
	switch {
	case !ok || vol.OwnerID != s.cfg.Self || s.vols == nil:
		return destroyed{}, fmt.Errorf("%w: %s/%s", ErrNotVolumeOwner, req.Namespace, req.Volume)
	case mounted:
		return destroyed{}, fmt.Errorf("%w: %s/%s", ErrVolumeInUse, req.Namespace, req.Volume)
	}
	if err := s.vols.Destroy(req.Namespace, req.Volume); err != nil && !errors.Is(err, volume.ErrNotFound) {
		return destroyed{}, err
	}
	s.cfg.Logger.Info("destroyed a removed namespace's volume", "volume", req.Namespace+"/"+req.Volume)
	return destroyed{}, nil
}

// Restart restarts a service's container where it runs, under its
// namespace's lock, and returns once it is ready again.
func (s *Services) Restart(ctx context.Context, service string) (ctlapi.RestartResult, error) {
	ns, name, err := factview.SplitService(service)
	if err != nil {
		return ctlapi.RestartResult{}, err
	}
	if _, err := s.service(ns, name); err != nil {
		return ctlapi.RestartResult{}, err
	}
	holder := s.cfg.Name + "/restart/" + name
	lock, err := nslock.Acquire(ctx, s.facts, ns, holder, s.cfg.LockLease, s.cfg.Logger)
	if err != nil {
		return ctlapi.RestartResult{}, err
	}
	defer lock.Release()
	sv, err := s.service(ns, name) // again, under the lock
	if err != nil {
		return ctlapi.RestartResult{}, err
	}
	machine := factview.NameOf(s.gossip, s.facts, sv.MachineID)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	r, err := routeRestart.Call(cctx, s.peers, sv.MachineID, restartRequest{Namespace: ns, Service: name, Holder: holder})
	if err != nil {
		return ctlapi.RestartResult{}, fmt.Errorf("restarting %s on %s: %w", service, machine, err)
	}
	return ctlapi.RestartResult{Service: service, Machine: machine, Took: ctlapi.Duration(r.Took)}, nil
}

// handleRestart (the service's machine): stop the container with the
// service's grace, start it, wait until ready.
func (s *Services) handleRestart(ctx context.Context, _ string, req restartRequest) (restarted, error) {
	if err := s.requireLock(ctx, req.Namespace, req.Holder); err != nil {
		return restarted{}, err
	}
	var sv fsm.Service
	var ok bool
	s.facts.Read(func(st *fsm.State) { sv, ok = st.Service(req.Namespace, req.Service) })
	if !ok || sv.MachineID != s.cfg.Self {
		return restarted{}, fmt.Errorf("%w: %s/%s", ErrNotOwner, req.Namespace, req.Service)
	}
	cs, err := s.rt.List(ctx)
	if err != nil {
		return restarted{}, err
	}
	for _, c := range cs {
		if c.Namespace != req.Namespace || c.Service != req.Service {
			continue
		}
		began := time.Now()
		key := req.Namespace + "/" + req.Service
		s.mu.Lock()
		s.restarting[key] = true
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			delete(s.restarting, key)
			s.mu.Unlock()
		}()
		rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP}
		if _, err := s.rt.Stop(ctx, c.ID, runtime.StopGrace(sv.Spec)); err != nil {
			return restarted{}, err
		}
		if len(sv.Spec.Secrets) > 0 {
			// A restart is when the container takes its secrets' new values.
			if err := s.rt.WriteSecrets(rs); err != nil {
				s.rt.Restart(ctx, c.ID)
				return restarted{}, err
			}
		}
		if err := s.rt.Restart(ctx, c.ID); err != nil {
			return restarted{}, err
		}
		if err := s.rt.WaitReady(ctx, c, rs); err != nil {
			return restarted{}, err
		}
		s.cfg.Logger.Info("restarted a service", "service", req.Namespace+"/"+req.Service, "took", time.Since(began))
		return restarted{Took: time.Since(began)}, nil
	}
	return restarted{}, fmt.Errorf("%w: %s/%s", ErrNoContainer, req.Namespace, req.Service)
}

// requireLock checks, with this machine caught up with the leader (the
// lock was just taken through it), that holder holds the namespace's
// lock: what every action asked of this machine needs.
func (s *Services) requireLock(ctx context.Context, ns, holder string) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := s.facts.CaughtUp(cctx)
	cancel()
	if err != nil {
		return fmt.Errorf("catching up with the leader's facts: %w", err)
	}
	var lock fsm.Lock
	var held bool
	s.facts.Read(func(st *fsm.State) { lock, held = st.Lock(ns) })
	if !held || lock.Holder != holder {
		return fmt.Errorf("%w: namespace %s", ErrNotLocked, ns)
	}
	return nil
}

// service looks the service up.
func (s *Services) service(ns, name string) (fsm.Service, error) {
	var sv fsm.Service
	var ok bool
	s.facts.Read(func(st *fsm.State) { sv, ok = st.Service(ns, name) })
	if !ok {
		return fsm.Service{}, &ctlapi.APIError{Status: http.StatusNotFound, Code: ctlapi.CodeUnknownService, Err: fmt.Errorf("no service %s/%s", ns, name)}
	}
	return sv, nil
}
