package lab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Registry is a CNCF Distribution registry (Debian's docker-registry)
// running on a lab host: plain HTTP on the host's underlay address, which
// the lab's engines trust as an insecure registry, with htpasswd logins.
type Registry struct {
	Addr string // host:port, as image references name it
	Proc *Proc
}

// registryConfig is the registry's configuration: storage in the host's
// directory, one htpasswd file, no other service.
const registryConfig = `version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
auth:
  htpasswd:
    realm: drover-lab
    path: %s
`

// StartRegistry runs a registry on h that admits user with password.
func (h *Host) StartRegistry(user, password string) (*Registry, error) {
	dir := filepath.Join(h.Dir, "registry")
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		return nil, err
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return nil, err
	}
	htpasswd := filepath.Join(dir, "htpasswd")
	if err := os.WriteFile(htpasswd, []byte(user+":"+string(hash)+"\n"), 0o600); err != nil {
		return nil, err
	}
	addr := net.JoinHostPort(h.UnderlayIP, "5000")
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(registryConfig, filepath.Join(dir, "data"), addr, htpasswd)), 0o600); err != nil {
		return nil, err
	}
	p, err := h.Start("registry", "docker-registry", "serve", cfg)
	if err != nil {
		return nil, err
	}
	// It answers /v2/ with 401 once it listens.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := h.Run(context.Background(), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://"+addr+"/v2/")
		if err == nil && out == fmt.Sprint(http.StatusUnauthorized) {
			return &Registry{Addr: addr, Proc: p}, nil
		}
		if p.Exited() || time.Now().After(deadline) {
			b, _ := os.ReadFile(p.LogPath())
			p.Stop(5 * time.Second)
			return nil, fmt.Errorf("registry on %s does not answer (%s %v); its log:\n%s", h.Name, out, err, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
