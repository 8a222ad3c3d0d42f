package agent

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/internal/atomicfile"
)

// Files the daemon keeps in its data dir.
const (
	machineIDFile  = "machine-id"
	clusterKeyFile = "cluster.key"
)

// loadOrCreateMachineID returns this machine's id, made once and kept.
func loadOrCreateMachineID(dataDir string) (string, error) {
	path := filepath.Join(dataDir, machineIDFile)
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if len(id) != 32 || strings.Trim(id, "0123456789abcdef") != "" {
			return "", fmt.Errorf("machine id file %s holds %q, not 32 hex digits", path, id)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("reading machine id: %w", err)
	}
	raw := make([]byte, 16)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("making machine id: %w", err)
	}
	id := hex.EncodeToString(raw)
	if err := atomicfile.Write(path, []byte(id+"\n"), 0o600); err != nil {
		return "", err
	}
	return id, nil
}

// encodeKey and decodeKey give the cluster key's text form: standard base64.
func encodeKey(key []byte) string { return base64.StdEncoding.EncodeToString(key) }

func decodeKey(text, source string) ([]byte, error) {
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return nil, fmt.Errorf("cluster key in %s is not base64: %w", source, err)
	}
	if len(key) != cluster.KeySize {
		return nil, fmt.Errorf("cluster key in %s is %d bytes, want %d: %w", source, len(key), cluster.KeySize, cluster.ErrNoKey)
	}
	return key, nil
}

// readKeyFile reads a cluster key file; a missing file is (nil, nil).
func readKeyFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading cluster key: %w", err)
	}
	return decodeKey(string(b), path)
}

func newClusterKey() ([]byte, error) {
	key := make([]byte, cluster.KeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("making cluster key: %w", err)
	}
	return key, nil
}

func saveKey(dataDir string, key []byte) error {
	return atomicfile.Write(filepath.Join(dataDir, clusterKeyFile), []byte(encodeKey(key)+"\n"), 0o600)
}

// A join token carries what a new machine needs to join with one command:
// the cluster key and gossip addresses of members. It is a secret.
const tokenPrefix = "drover1."

type joinToken struct {
	Key   string   `json:"key"`
	Addrs []string `json:"addrs"`
}

func makeToken(key []byte, addrs []string) (string, error) {
	b, err := json.Marshal(joinToken{Key: encodeKey(key), Addrs: addrs})
	if err != nil {
		return "", err
	}
	return tokenPrefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// ErrBadToken marks a join token that cannot be read.
var ErrBadToken = errors.New("bad join token")

func parseToken(tok string) (key []byte, addrs []string, err error) {
	body, ok := strings.CutPrefix(strings.TrimSpace(tok), tokenPrefix)
	if !ok {
		return nil, nil, fmt.Errorf("%w: it does not start with %q", ErrBadToken, tokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	var jt joinToken
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&jt); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	if key, err = decodeKey(jt.Key, "the join token"); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	if len(jt.Addrs) == 0 {
		return nil, nil, fmt.Errorf("%w: it names no machine to join", ErrBadToken)
	}
	return key, jt.Addrs, nil
}
