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
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
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

// readKeyFile reads a cluster key file: one base64 key a line, the key
// gossip encrypts with first, then keys it also decrypts with (during a
// rotation). A missing file is (nil, nil).
func readKeyFile(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading cluster key: %w", err)
	}
	var keys [][]byte
	for i, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, err := decodeKey(line, fmt.Sprintf("%s line %d", path, i+1))
		if err != nil {
			return nil, err
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("cluster key file %s holds no key: %w", path, cluster.ErrNoKey)
	}
	return keys, nil
}

func newClusterKey() ([]byte, error) {
	key := make([]byte, cluster.KeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("making cluster key: %w", err)
	}
	return key, nil
}

// saveKeys keeps the gossip keys in the data dir, the primary first.
func saveKeys(dataDir string, keys [][]byte) error {
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(encodeKey(k) + "\n")
	}
	return atomicfile.Write(filepath.Join(dataDir, clusterKeyFile), []byte(b.String()), 0o600)
}

// A join token carries what a new machine needs to join with one command:
// the cluster key, gossip addresses of members, and a join grant (its id,
// secret and expiry) that the leader checks before it admits the
// machine. It is a secret.
const tokenPrefix = "drover2."

type joinToken struct {
	Key     string    `json:"key"`
	Addrs   []string  `json:"addrs"`
	Grant   string    `json:"grant"`
	Secret  string    `json:"secret"`
	Expires time.Time `json:"expires"`
}

// parsedToken is a join token read.
type parsedToken struct {
	key     []byte
	addrs   []string
	grant   string
	secret  []byte
	expires time.Time
}

func makeToken(key []byte, addrs []string, g fsm.JoinGrant) (string, error) {
	b, err := json.Marshal(joinToken{Key: encodeKey(key), Addrs: addrs, Grant: g.ID,
		Secret: base64.RawURLEncoding.EncodeToString(g.Secret), Expires: g.ExpiresAt.UTC()})
	if err != nil {
		return "", err
	}
	return tokenPrefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// ErrBadToken marks a join token that cannot be read, or has expired.
var ErrBadToken = errors.New("bad join token")

func parseToken(tok string, now time.Time) (parsedToken, error) {
	tok = strings.TrimSpace(tok)
	if strings.HasPrefix(tok, "drover1.") {
		return parsedToken{}, fmt.Errorf("%w: it is of the older kind, without a join grant: make a new one with `droverctl cluster join-token`", ErrBadToken)
	}
	body, ok := strings.CutPrefix(tok, tokenPrefix)
	if !ok {
		return parsedToken{}, fmt.Errorf("%w: it does not start with %q", ErrBadToken, tokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return parsedToken{}, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	var jt joinToken
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&jt); err != nil {
		return parsedToken{}, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	out := parsedToken{addrs: jt.Addrs, grant: jt.Grant, expires: jt.Expires}
	if out.key, err = decodeKey(jt.Key, "the join token"); err != nil {
		return parsedToken{}, fmt.Errorf("%w: %v", ErrBadToken, err)
	}
	if len(jt.Addrs) == 0 {
		return parsedToken{}, fmt.Errorf("%w: it names no machine to join", ErrBadToken)
	}
	if out.secret, err = base64.RawURLEncoding.DecodeString(jt.Secret); err != nil || jt.Grant == "" || len(out.secret) == 0 {
		return parsedToken{}, fmt.Errorf("%w: its join grant is missing or unreadable", ErrBadToken)
	}
	if !jt.Expires.After(now) {
		return parsedToken{}, fmt.Errorf("%w: join token %s expired at %s: make a new one with `droverctl cluster join-token` on a member", ErrBadToken, jt.Grant, jt.Expires.UTC().Format(time.RFC3339))
	}
	return out, nil
}
