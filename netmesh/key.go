// Package netmesh owns this machine's WireGuard key and device. It is
// given a Config (its key, port, overlay address and peers) and makes the
// device match it; it knows nothing of gossip or Raft.
package netmesh

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/drover-sh/drover/internal/atomicfile"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// LoadOrCreateKey returns the private key kept at path, making it once
// (mode 0600, written atomically). A file that holds no valid key is an
// error naming the path; it is never silently replaced.
func LoadOrCreateKey(path string) (wgtypes.Key, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		key, err := wgtypes.ParseKey(strings.TrimSpace(string(b)))
		if err != nil {
			return wgtypes.Key{}, fmt.Errorf("WireGuard key file %s: %w", path, err)
		}
		return key, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return wgtypes.Key{}, fmt.Errorf("reading WireGuard key: %w", err)
	}
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("making WireGuard key: %w", err)
	}
	if err := atomicfile.Write(path, []byte(key.String()+"\n"), 0o600); err != nil {
		return wgtypes.Key{}, err
	}
	return key, nil
}
