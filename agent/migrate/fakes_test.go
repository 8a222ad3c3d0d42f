package migrate

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/volume"
)

// guids are unique across every fake machine of a test binary, as ZFS
// GUIDs are across pools.
var guids atomic.Uint64

// fakeDataset is a dataset of fakeVolumes: its snapshots, its mark, and
// the bytes written since its last snapshot.
type fakeDataset struct {
	snaps  []volume.Snapshot
	origin string
}

// fakeVolumes is a machine's pool in memory. A stream carries the
// snapshots it creates as a JSON header, then payload bytes.
type fakeVolumes struct {
	mu      sync.Mutex
	parent  string
	ds      map[string]*fakeDataset
	payload int   // bytes a stream carries beyond its header
	failRx  error // ReceiveInto fails with it when set
	free    uint64
}

func newFakeVolumes(parent string) *fakeVolumes {
	return &fakeVolumes{parent: parent, ds: map[string]*fakeDataset{}, payload: 4096, free: 8 << 30}
}

func (f *fakeVolumes) Dataset(ns, name string) string { return f.parent + "/" + ns + "/" + name }
func (f *fakeVolumes) StagingDataset(id, vol string) string {
	return f.parent + "-incoming/" + id + "-" + vol
}

// create makes a dataset with snapshots named snaps (fresh GUIDs).
func (f *fakeVolumes) create(name string, snaps ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := &fakeDataset{}
	for _, s := range snaps {
		d.snaps = append(d.snaps, volume.Snapshot{Name: s, GUID: guids.Add(1)})
	}
	f.ds[name] = d
}

func (f *fakeVolumes) Exists(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ds[name] != nil
}

func (f *fakeVolumes) names() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for n := range f.ds {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func (f *fakeVolumes) snapNames(name string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.ds[name]
	if d == nil {
		return nil
	}
	var out []string
	for _, s := range d.snaps {
		out = append(out, s.Name)
	}
	return out
}

func (f *fakeVolumes) Snapshot(ns, name, snap string) (volume.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.ds[f.Dataset(ns, name)]
	if d == nil {
		return volume.Snapshot{}, fmt.Errorf("snapshot of %s/%s: %w", ns, name, volume.ErrNotFound)
	}
	for _, s := range d.snaps {
		if s.Name == snap {
			return s, nil
		}
	}
	s := volume.Snapshot{Name: snap, GUID: guids.Add(1)}
	d.snaps = append(d.snaps, s)
	return s, nil
}

// streamHeader is what a fake stream carries first.
type streamHeader struct {
	Base  string            `json:"base"`
	Snaps []volume.Snapshot `json:"snaps"`
}

func (f *fakeVolumes) Send(ns, name, snap, base string, w io.Writer) error {
	f.mu.Lock()
	d := f.ds[f.Dataset(ns, name)]
	if d == nil {
		f.mu.Unlock()
		return fmt.Errorf("send of %s/%s: %w", ns, name, volume.ErrNotFound)
	}
	h := streamHeader{Base: base}
	in := base == ""
	for _, s := range d.snaps {
		if in {
			h.Snaps = append(h.Snaps, s)
		}
		if s.Name == base {
			in = true
		}
		if s.Name == snap {
			break
		}
	}
	payload := f.payload
	f.mu.Unlock()
	if !in {
		return fmt.Errorf("send of %s/%s: base %s not found", ns, name, base)
	}
	b, _ := json.Marshal(h)
	if _, err := w.Write(append(b, '\n')); err != nil {
		return err
	}
	_, err := w.Write(make([]byte, payload))
	return err
}

func (f *fakeVolumes) ReceiveInto(name string, incremental bool, r io.Reader) error {
	br := bufio.NewReader(r)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("receiving into %s: %w", name, err)
	}
	var h streamHeader
	if err := json.Unmarshal(line, &h); err != nil {
		return fmt.Errorf("receiving into %s: %w", name, err)
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("receiving into %s: %w", name, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failRx != nil {
		return f.failRx
	}
	d := f.ds[name]
	switch {
	case !incremental && d != nil:
		return fmt.Errorf("receiving into %s: dataset exists", name)
	case !incremental:
		f.ds[name] = &fakeDataset{snaps: h.Snaps}
		return nil
	case d == nil:
		return fmt.Errorf("receiving into %s: %w", name, volume.ErrNotFound)
	}
	// As zfs-fuse: the base must be the newest snapshot (-F discards
	// only changes made since it).
	if len(d.snaps) == 0 || d.snaps[len(d.snaps)-1].Name != h.Base {
		return fmt.Errorf("receiving into %s: most recent snapshot does not match incremental source %s", name, h.Base)
	}
	d.snaps = append(d.snaps, h.Snaps...)
	return nil
}

func (f *fakeVolumes) SnapshotGUID(name, snap string) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.ds[name]; d != nil {
		for _, s := range d.snaps {
			if s.Name == snap {
				return s.GUID, nil
			}
		}
	}
	return 0, fmt.Errorf("%s@%s: %w", name, snap, volume.ErrNotFound)
}

func (f *fakeVolumes) MoveDataset(from, to string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ds[from] == nil || f.ds[to] != nil {
		return fmt.Errorf("moving %s to %s: one is missing or the other there", from, to)
	}
	f.ds[to] = f.ds[from]
	delete(f.ds, from)
	return nil
}

func (f *fakeVolumes) DestroyDataset(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ds, name)
	return nil
}

func (f *fakeVolumes) Staging() ([]string, error) {
	var out []string
	for _, n := range f.names() {
		if strings.HasPrefix(n, f.parent+"-incoming/") {
			out = append(out, n)
		}
	}
	return out, nil
}

func (f *fakeVolumes) Get(ns, name string) (volume.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ds := f.Dataset(ns, name)
	d := f.ds[ds]
	if d == nil {
		return volume.Info{}, fmt.Errorf("%s/%s: %w", ns, name, volume.ErrNotFound)
	}
	return volume.Info{Namespace: ns, Name: name, Dataset: ds, Mountpoint: "/" + ds, ReferencedBytes: 1 << 20, Snapshots: slices.Clone(d.snaps)}, nil
}

func (f *fakeVolumes) SetProperties(ns, name string, _ volume.Properties) error {
	if !f.Exists(f.Dataset(ns, name)) {
		return errors.New("no dataset " + f.Dataset(ns, name))
	}
	return nil
}

func (f *fakeVolumes) Adopt(staging, ns, name string) (volume.Info, error) {
	if err := f.MoveDataset(staging, f.Dataset(ns, name)); err != nil {
		return volume.Info{}, fmt.Errorf("adopting: %w", err)
	}
	return f.Get(ns, name)
}

func (f *fakeVolumes) SetOrigin(ns, name, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.ds[f.Dataset(ns, name)]
	if d == nil {
		return fmt.Errorf("marking %s/%s: %w", ns, name, volume.ErrNotFound)
	}
	d.origin = id
	return nil
}

func (f *fakeVolumes) Origin(ns, name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.ds[f.Dataset(ns, name)]; d != nil {
		return d.origin
	}
	return ""
}

func (f *fakeVolumes) PruneSnapshots(ns, name, keep string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.ds[f.Dataset(ns, name)]
	if d == nil {
		return fmt.Errorf("pruning %s/%s: %w", ns, name, volume.ErrNotFound)
	}
	d.snaps = slices.DeleteFunc(d.snaps, func(s volume.Snapshot) bool {
		return s.Name != keep && strings.HasPrefix(s.Name, volume.SnapshotPrefix)
	})
	return nil
}

func (f *fakeVolumes) DestroySnapshotsOf(ns, name, prefix string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.ds[f.Dataset(ns, name)]
	if d == nil {
		return fmt.Errorf("destroying snapshots of %s/%s: %w", ns, name, volume.ErrNotFound)
	}
	d.snaps = slices.DeleteFunc(d.snaps, func(s volume.Snapshot) bool { return strings.HasPrefix(s.Name, prefix) })
	return nil
}

func (f *fakeVolumes) RollbackTo(name, snap string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.ds[name]
	if d == nil {
		return fmt.Errorf("rolling back %s: %w", name, volume.ErrNotFound)
	}
	i := slices.IndexFunc(d.snaps, func(s volume.Snapshot) bool { return s.Name == snap })
	if i < 0 {
		return fmt.Errorf("rolling %s back to %s: no such snapshot", name, snap)
	}
	d.snaps = d.snaps[:i+1]
	return nil
}

func (f *fakeVolumes) FreeBytes() (uint64, error) { return f.free, nil }

// fakeRuntime is a machine's container engine in memory.
type fakeRuntime struct {
	mu         sync.Mutex
	next       int
	byID       map[string]*runtime.Container
	images     map[string]bool
	failReady  error // WaitReady fails with it when set
	stopped    []string
	graces     []time.Duration // the grace of every Stop
	killOnStop bool            // Stop reports the container killed
	pullable   map[string]bool // images its registry holds
	pulled     []string
	loaded     []string // images streamed in from another machine
	execs      [][]string
	noHold     bool // CanHold says no
	released   []string
}

func newFakeRuntime(images ...string) *fakeRuntime {
	r := &fakeRuntime{byID: map[string]*runtime.Container{}, images: map[string]bool{}, pullable: map[string]bool{}}
	for _, i := range images {
		r.images[i] = true
	}
	return r
}

func (r *fakeRuntime) List(context.Context) ([]runtime.Container, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []runtime.Container
	for _, c := range r.byID {
		out = append(out, *c)
	}
	slices.SortFunc(out, func(a, b runtime.Container) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// running gives the service's container, if any.
func (r *fakeRuntime) container(ns, svc string) (runtime.Container, bool) {
	cs, _ := r.List(context.Background())
	for _, c := range cs {
		if c.Namespace == ns && c.Service == svc {
			return c, true
		}
	}
	return runtime.Container{}, false
}

func (r *fakeRuntime) Start(ctx context.Context, rs runtime.RunSpec) (runtime.Container, error) {
	c, _ := r.Create(ctx, rs)
	return c, r.Restart(ctx, c.ID)
}

func (r *fakeRuntime) Create(_ context.Context, rs runtime.RunSpec) (runtime.Container, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, c := range r.byID {
		if c.Namespace == rs.Namespace && c.Service == rs.Spec.Name {
			delete(r.byID, id)
		}
	}
	r.next++
	c := &runtime.Container{ID: fmt.Sprintf("c%d", r.next), Namespace: rs.Namespace, Service: rs.Spec.Name,
		Generation: rs.Generation, SpecHash: rs.Hash(), StartedAt: time.Now()}
	r.byID[c.ID] = c
	return *c, nil
}

func (r *fakeRuntime) WaitReady(context.Context, runtime.Container, runtime.RunSpec) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failReady
}

func (r *fakeRuntime) HasImage(_ context.Context, image string) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.images[image], nil
}

// CanPull: the fake's registry holds the images named in pullable.
func (r *fakeRuntime) CanPull(_ context.Context, image string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.pullable[image] {
		return errors.New("image cannot be resolved to a digest: " + image + ": manifest unknown")
	}
	return nil
}

func (r *fakeRuntime) EnsureImage(ctx context.Context, image string, _ func(runtime.PullProgress)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.images[image] {
		return nil
	}
	if !r.pullable[image] {
		return errors.New("image pull failed: " + image + ": manifest unknown")
	}
	r.images[image] = true
	r.pulled = append(r.pulled, image)
	return nil
}

// SaveImage gives "image:" and the image's name as its bytes.
func (r *fakeRuntime) SaveImage(_ context.Context, image string) (io.ReadCloser, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.images[image] {
		return nil, errors.New("image " + image + " is not on this machine")
	}
	return io.NopCloser(strings.NewReader("image:" + image)), nil
}

func (r *fakeRuntime) LoadImage(_ context.Context, image string, body io.Reader) error {
	b, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if string(b) != "image:"+image {
		return errors.New("the stream is not the image " + image)
	}
	r.images[image] = true
	r.loaded = append(r.loaded, image)
	return nil
}

func (r *fakeRuntime) Stop(_ context.Context, id string, grace time.Duration) (runtime.Stopped, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.byID[id]
	if c == nil {
		return runtime.Stopped{}, errors.New("no such container " + id)
	}
	c.Running = false
	r.stopped = append(r.stopped, id)
	r.graces = append(r.graces, grace)
	return runtime.Stopped{Killed: r.killOnStop}, nil
}

func (r *fakeRuntime) Restart(_ context.Context, id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.byID[id]
	if c == nil {
		return errors.New("no such container " + id)
	}
	c.Running = true
	return nil
}

func (r *fakeRuntime) CanHold() bool { return !r.noHold }

// CreateHeld: the container runs, held (its command has not started).
func (r *fakeRuntime) CreateHeld(ctx context.Context, rs runtime.RunSpec) (runtime.Container, error) {
	c, _ := r.Create(ctx, rs)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.byID[c.ID].Running, r.byID[c.ID].Held = true, true
	return *r.byID[c.ID], nil
}

func (r *fakeRuntime) Release(_ context.Context, c runtime.Container) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ctr := r.byID[c.ID]
	if ctr == nil || !ctr.Held || !ctr.Running {
		return errors.New("container " + c.ID + " is not held")
	}
	ctr.Held = false
	r.released = append(r.released, c.ID)
	return nil
}

func (r *fakeRuntime) Halt(ctx context.Context, id string, grace time.Duration) (runtime.Stopped, func() error, error) {
	st, err := r.Stop(ctx, id, grace)
	return st, func() error { return nil }, err
}

func (r *fakeRuntime) Exec(_ context.Context, id string, cmd []string) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c := r.byID[id]; c == nil || !c.Running {
		return 0, errors.New("container " + id + " is not running")
	}
	r.execs = append(r.execs, cmd)
	return 0, nil
}

func (r *fakeRuntime) Remove(_ context.Context, id string, _ time.Duration) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.byID, id)
	return nil
}

// fakeLoopback is a machine's loopback addresses in memory.
type fakeLoopback struct {
	mu  sync.Mutex
	ips map[netip.Addr]bool
}

func (l *fakeLoopback) Add(ip netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ips == nil {
		l.ips = map[netip.Addr]bool{}
	}
	l.ips[ip] = true
	return nil
}

func (l *fakeLoopback) Remove(ip netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.ips, ip)
	return nil
}

func (l *fakeLoopback) has(ip netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ips[ip]
}
