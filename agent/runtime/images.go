package runtime

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/registry"
	"github.com/docker/docker/client"
	"github.com/drover-sh/drover/internal/atomicfile"
)

// Credentials are registry logins from a file in Docker's config.json
// form ({"auths": {"HOST[:PORT]": {"auth": base64("user:pass")}}}, or
// "username" and "password"). The daemon reads the file at each use, so
// an operator changes a login without a restart; nothing of it ever goes
// through the facts.
type Credentials struct {
	File string // empty: no logins
}

// ErrBadCredentialsFile marks a credentials file that cannot be read.
var ErrBadCredentialsFile = errors.New("bad registry credentials file")

type dockerConfig struct {
	Auths map[string]struct {
		Auth     string `json:"auth"`
		Username string `json:"username"`
		Password string `json:"password"`
	} `json:"auths"`
}

// maxCredentialsFile bounds what is read as a credentials file.
const maxCredentialsFile = 1 << 20

// For gives the login for a registry host, if the file has one.
func (c Credentials) For(host string) (registry.AuthConfig, bool, error) {
	if c.File == "" {
		return registry.AuthConfig{}, false, nil
	}
	f, err := os.Open(c.File)
	if err != nil {
		return registry.AuthConfig{}, false, fmt.Errorf("%w %s: %v", ErrBadCredentialsFile, c.File, err)
	}
	defer f.Close()
	var cfg dockerConfig
	if err := json.NewDecoder(io.LimitReader(f, maxCredentialsFile)).Decode(&cfg); err != nil {
		return registry.AuthConfig{}, false, fmt.Errorf("%w %s: %v", ErrBadCredentialsFile, c.File, err)
	}
	for key, a := range cfg.Auths {
		if registryKey(key) != host {
			continue
		}
		out := registry.AuthConfig{Username: a.Username, Password: a.Password, ServerAddress: host}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			user, pass, ok := strings.Cut(string(raw), ":")
			if err != nil || !ok {
				return registry.AuthConfig{}, false, fmt.Errorf("%w %s: the auth of %s is not base64 of user:password", ErrBadCredentialsFile, c.File, key)
			}
			out.Username, out.Password = user, pass
		}
		return out, true, nil
	}
	return registry.AuthConfig{}, false, nil
}

// registryKey reduces a config.json key ("https://host:5000/v1/") to the
// host as an image reference names it.
func registryKey(key string) string {
	key = strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://")
	key, _, _ = strings.Cut(key, "/")
	if key == "index.docker.io" || key == "registry-1.docker.io" {
		return "docker.io"
	}
	return key
}

// RegistryOf is the registry host an image reference names ("docker.io"
// when it names none).
func RegistryOf(image string) (string, error) {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return "", fmt.Errorf("image %q is not a valid reference: %w", image, err)
	}
	return reference.Domain(named), nil
}

// explicitRegistry tells whether an image names its registry host.
func explicitRegistry(image string) bool {
	first, _, found := strings.Cut(image, "/")
	return found && (strings.ContainsAny(first, ".:") || first == "localhost")
}

// encodedAuth is the X-Registry-Auth value for an image, "" without a
// login for its registry.
func (c Credentials) encodedAuth(image string) (string, error) {
	host, err := RegistryOf(image)
	if err != nil {
		return "", err
	}
	a, ok, err := c.For(host)
	if err != nil || !ok {
		return "", err
	}
	return registry.EncodeAuthConfig(a)
}

// Errors of resolving and pulling images, to match with errors.Is.
var (
	ErrImageUnresolved = errors.New("image cannot be resolved to a digest")
	ErrPull            = errors.New("image pull failed")
	ErrLocalImageOnly  = errors.New("image is in no registry and not on this machine")
)

// Resolve pins an image reference. An image that names its registry is
// asked of that registry: NAME@sha256:... of what the tag names now; a
// registry that is unreachable, a login that is refused or an unknown tag
// is an error naming the image, the registry and this machine. An image
// that names none (the default registry) is taken from this machine's
// engine when it has it — the digest it was pulled at, or, for an image
// built or loaded here and in no registry, its id (sha256:...) — and
// asked of the default registry otherwise.
func (d *Docker) Resolve(ctx context.Context, image string) (string, error) {
	host, err := RegistryOf(image)
	if err != nil {
		return "", err
	}
	named, _ := reference.ParseNormalizedNamed(image)
	if !explicitRegistry(image) {
		if local, _, err := d.cli.ImageInspectWithRaw(ctx, image); err == nil {
			for _, rd := range local.RepoDigests {
				if pinned, err := reference.ParseNormalizedNamed(rd); err == nil && reference.TrimNamed(pinned).Name() == reference.TrimNamed(named).Name() {
					return pinned.String(), nil
				}
			}
			return local.ID, nil
		}
	}
	auth, err := d.creds.encodedAuth(image)
	if err != nil {
		return "", err
	}
	insp, err := d.cli.DistributionInspect(ctx, image, auth)
	if err != nil {
		return "", fmt.Errorf("%w: image %s, registry %s, from machine %s: %v", ErrImageUnresolved, image, host, d.machineName, err)
	}
	pinned, err := reference.WithDigest(reference.TrimNamed(named), insp.Descriptor.Digest)
	if err != nil {
		return "", fmt.Errorf("pinning %s: %w", image, err)
	}
	return pinned.String(), nil
}

// pullMessage is one line of the engine's pull stream.
type pullMessage struct {
	ID       string `json:"id"`
	Status   string `json:"status"`
	Progress *struct {
		Current int64 `json:"current"`
		Total   int64 `json:"total"`
	} `json:"progressDetail"`
	Error *struct {
		Message string `json:"message"`
	} `json:"errorDetail"`
}

// PullProgress is one step of a pull, as the engine reports it.
type PullProgress struct {
	Layer   string
	Status  string
	Current int64
	Total   int64
}

// progressEvery is how often ThrottleProgress passes a pull's progress on.
const progressEvery = 500 * time.Millisecond

// ThrottleProgress passes on at most one report per half second, and
// every change of status (a layer done), so that a pull's progress can
// cross machines and reach a terminal without flooding either.
func ThrottleProgress(f func(PullProgress)) func(PullProgress) {
	var last time.Time
	var status string
	return func(pp PullProgress) {
		if time.Since(last) < progressEvery && pp.Status == status {
			return
		}
		last, status = time.Now(), pp.Status
		f(pp)
	}
}

// EnsureImage makes sure the engine has ref (as Resolve gave it): present,
// or pulled from its registry with this machine's login. progress, when
// not nil, gets the engine's reports.
func (d *Docker) EnsureImage(ctx context.Context, ref string, progress func(PullProgress)) error {
	if local, err := d.local(ctx, ref); err != nil || local != "" {
		return err
	}
	if strings.HasPrefix(ref, "sha256:") {
		return fmt.Errorf("%w: image %s is not on machine %s: it was pinned to an image that no registry holds; put it there with `droverctl image push` or `docker load`", ErrLocalImageOnly, ref, d.machineName)
	}
	host, err := RegistryOf(ref)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		return fmt.Errorf("%w: image %s from registry %s on machine %s: %v", ErrPull, ref, host, d.machineName, err)
	}
	auth, err := d.creds.encodedAuth(ref)
	if err != nil {
		return err
	}
	rc, err := d.cli.ImagePull(ctx, ref, image.PullOptions{RegistryAuth: auth})
	if err != nil {
		return fail(err)
	}
	defer rc.Close()
	dec := json.NewDecoder(rc)
	for {
		var msg pullMessage
		if err := dec.Decode(&msg); err == io.EOF {
			break
		} else if err != nil {
			return fail(err)
		}
		if msg.Error != nil {
			return fail(errors.New(msg.Error.Message))
		}
		if progress != nil {
			p := PullProgress{Layer: msg.ID, Status: msg.Status}
			if msg.Progress != nil {
				p.Current, p.Total = msg.Progress.Current, msg.Progress.Total
			}
			progress(p)
		}
	}
	if ok, err := d.HasImage(ctx, ref); err != nil || !ok {
		return fail(fmt.Errorf("the engine does not have it after the pull (%v)", err))
	}
	return nil
}

// CanPull tells why this machine could not pull image, or nil: its
// registry answers for it with this machine's login.
func (d *Docker) CanPull(ctx context.Context, image string) error {
	if strings.HasPrefix(image, "sha256:") {
		return fmt.Errorf("%w: %s is a local image's id", ErrLocalImageOnly, image)
	}
	host, err := RegistryOf(image)
	if err != nil {
		return err
	}
	auth, err := d.creds.encodedAuth(image)
	if err != nil {
		return err
	}
	if _, err := d.cli.DistributionInspect(ctx, image, auth); err != nil {
		return fmt.Errorf("%w: image %s, registry %s, from machine %s: %v", ErrImageUnresolved, image, host, d.machineName, err)
	}
	return nil
}

// Loaded images are known by id only: `docker save` of NAME@sha256:...
// keeps no digest, so after a load the engine cannot find the image by
// the reference the service is pinned to. An alias file in the data dir
// maps such a reference to the id the load gave; every lookup of an image
// (HasImage, Start, EnsureImage) goes through it.
type aliases struct {
	mu   sync.Mutex
	file string // empty: none kept
}

func (a *aliases) read() map[string]string {
	out := map[string]string{}
	if a.file == "" {
		return out
	}
	if b, err := os.ReadFile(a.file); err == nil {
		json.Unmarshal(b, &out)
	}
	return out
}

func (a *aliases) lookup(ref string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.read()[ref]
}

func (a *aliases) add(ref, id string) error {
	if a.file == "" {
		return errors.New("no alias file for loaded images")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.read()
	m[ref] = id
	b, _ := json.Marshal(m)
	return atomicfile.Write(a.file, b, 0o600)
}

// local is the reference under which this engine has ref: ref itself, or
// the id of the image a load gave it; "" when it has neither.
func (d *Docker) local(ctx context.Context, ref string) (string, error) {
	_, _, err := d.cli.ImageInspectWithRaw(ctx, ref)
	if err == nil {
		return ref, nil
	}
	if !client.IsErrNotFound(err) {
		return "", fmt.Errorf("inspecting image %s: %w", ref, err)
	}
	if id := d.aliases.lookup(ref); id != "" {
		if _, _, err := d.cli.ImageInspectWithRaw(ctx, id); err == nil {
			return id, nil
		}
	}
	return "", nil
}

// SaveImage gives the image as `docker save` writes it.
func (d *Docker) SaveImage(ctx context.Context, ref string) (io.ReadCloser, error) {
	local, err := d.local(ctx, ref)
	if err != nil {
		return nil, err
	}
	if local == "" {
		return nil, fmt.Errorf("image %s is not on machine %s", ref, d.machineName)
	}
	rc, err := d.cli.ImageSave(ctx, []string{local})
	if err != nil {
		return nil, fmt.Errorf("saving image %s on machine %s: %w", ref, d.machineName, err)
	}
	return rc, nil
}

// LoadImage loads a `docker save` stream of ref, and makes ref name the
// loaded image on this machine.
func (d *Docker) LoadImage(ctx context.Context, ref string, r io.Reader) error {
	resp, err := d.cli.ImageLoad(ctx, r, true)
	if err != nil {
		return fmt.Errorf("loading image %s on machine %s: %w", ref, d.machineName, err)
	}
	defer resp.Body.Close()
	var id string
	dec := json.NewDecoder(resp.Body)
	for {
		var msg struct {
			Stream string `json:"stream"`
			Error  *struct {
				Message string `json:"message"`
			} `json:"errorDetail"`
		}
		if err := dec.Decode(&msg); err == io.EOF {
			break
		} else if err != nil {
			return fmt.Errorf("loading image %s on machine %s: reading the engine's answer: %w", ref, d.machineName, err)
		}
		if msg.Error != nil {
			return fmt.Errorf("loading image %s on machine %s: %s", ref, d.machineName, msg.Error.Message)
		}
		if v, ok := strings.CutPrefix(strings.TrimSpace(msg.Stream), "Loaded image ID: "); ok {
			id = v
		} else if name, ok := strings.CutPrefix(strings.TrimSpace(msg.Stream), "Loaded image: "); ok {
			if insp, _, err := d.cli.ImageInspectWithRaw(ctx, name); err == nil {
				id = insp.ID // saved by name: the engine names the tag
			}
		}
	}
	if local, err := d.local(ctx, ref); err != nil || local != "" {
		return err // loaded under its own name (an id, or a tag)
	}
	if id == "" {
		return fmt.Errorf("loading image %s on machine %s: the engine named no image", ref, d.machineName)
	}
	return d.aliases.add(ref, id)
}
