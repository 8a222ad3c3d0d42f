// Package keyring keeps this machine's gossip keys in line with the fact
// store's keyring, and rotates the cluster's gossip key without a gap in
// membership: install the new key everywhere, then encrypt with it
// everywhere, then retire the old one, each step only once every live
// machine has confirmed the one before.
package keyring

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
)

// Facts is the fact store as the keyring needs it.
type Facts interface {
	Read(func(*fsm.State))
	Apply(context.Context, fsm.Command) (json.RawMessage, error)
	// FactsChanged is closed when the store applies its next entry.
	FactsChanged() <-chan struct{}
}

// Gossip is this machine's gossip as the keyring needs it.
type Gossip interface {
	GossipKeys() [][]byte
	InstallKeyring(keys [][]byte, gen uint64) error
	Members() []cluster.Member
}

// Fingerprint names a key without showing it: the first 8 bytes of its
// SHA-256, in hex.
func Fingerprint(key []byte) string {
	sum := sha256.Sum256(key)
	return hex.EncodeToString(sum[:8])
}

// Keeper installs the facts' keyring on this machine and saves it, so
// that a restart in the middle of a rotation still holds every key in use.
type Keeper struct {
	Facts  Facts
	Gossip Gossip
	Save   func(keys [][]byte) error // persists the keys, primary first
	Logger *slog.Logger
	// Interval is how soon a keyring that failed to install is tried
	// again (500 ms when zero); otherwise the facts are looked at when
	// they change, and an idle machine does not wake for the keyring.
	Interval time.Duration

	installed uint64
}

// Run keeps the keyring until ctx ends.
func (k *Keeper) Run(ctx context.Context) {
	interval := k.Interval
	if interval == 0 {
		interval = 500 * time.Millisecond
	}
	retry := time.NewTicker(interval)
	defer retry.Stop()
	for {
		changed := k.Facts.FactsChanged()
		var again <-chan time.Time
		if !k.Sync() {
			again = retry.C
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-again:
		}
	}
}

// Sync installs the facts' keyring if it is newer than what this machine
// installed. It reports a failure in the log and returns false: the
// caller tries again.
func (k *Keeper) Sync() bool {
	var kr fsm.Keyring
	k.Facts.Read(func(s *fsm.State) { kr = s.Keyring() })
	if kr.Generation == 0 || kr.Generation <= k.installed {
		return true
	}
	if err := k.Save(kr.Keys); err != nil {
		k.Logger.Error("saving the gossip keyring", "generation", kr.Generation, "err", err)
		return false
	}
	if err := k.Gossip.InstallKeyring(kr.Keys, kr.Generation); err != nil {
		k.Logger.Error("installing the gossip keyring", "generation", kr.Generation, "err", err)
		return false
	}
	k.installed = kr.Generation
	k.Logger.Info("gossip keyring installed", "generation", kr.Generation, "primary", Fingerprint(kr.Keys[0]), "keys", len(kr.Keys))
	return true
}

// Rotation is the outcome of a key rotation.
type Rotation struct {
	Generation uint64   `json:"generation"`
	OldKey     string   `json:"old_key"` // fingerprints
	NewKey     string   `json:"new_key"`
	Confirmed  []string `json:"confirmed"` // machines that took every step
	NotAlive   []string `json:"not_alive"` // registered machines gossip did not show alive: they take the keyring from the facts when back
}

// ErrNotConfirmed: a live machine did not confirm a step in time; the
// rotation stopped with the old key still installed everywhere.
var ErrNotConfirmed = errors.New("a machine did not confirm the key rotation")

// Rotator runs a rotation from this machine.
type Rotator struct {
	Facts  Facts
	Gossip Gossip
	Logger *slog.Logger
	// StepTimeout bounds how long each step waits for every live machine
	// (60 s when zero).
	StepTimeout time.Duration
	// NewKey makes the new key (random when nil).
	NewKey func() ([]byte, error)
}

// Rotate replaces the cluster's gossip key. Each of its three steps is a
// fact; the next is proposed only once every machine gossip shows alive
// gossips that it installed the one before, so at every moment every
// live machine can read what every other sends.
func (r *Rotator) Rotate(ctx context.Context) (Rotation, error) {
	newKey, err := r.makeKey()
	if err != nil {
		return Rotation{}, err
	}
	var current [][]byte
	r.Facts.Read(func(s *fsm.State) { current = s.Keyring().Keys })
	if len(current) == 0 {
		current = r.Gossip.GossipKeys()[:1]
	}
	old := current[0]
	out := Rotation{OldKey: Fingerprint(old), NewKey: Fingerprint(newKey)}
	steps := []struct {
		what string
		keys [][]byte
	}{
		{"install the new key beside the old", [][]byte{old, newKey}},
		{"encrypt with the new key", [][]byte{newKey, old}},
		{"retire the old key", [][]byte{newKey}},
	}
	for _, step := range steps {
		raw, err := r.Facts.Apply(ctx, fsm.SetKeyring{Keys: step.keys, At: time.Now()})
		if err != nil {
			return out, fmt.Errorf("key rotation, step %q: %w", step.what, err)
		}
		var kr fsm.Keyring
		if err := json.Unmarshal(raw, &kr); err != nil {
			return out, fmt.Errorf("key rotation, step %q: reading the result: %w", step.what, err)
		}
		out.Generation = kr.Generation
		confirmed, notAlive, err := r.waitConfirmed(ctx, kr.Generation)
		if err != nil {
			return out, fmt.Errorf("key rotation, step %q: %w", step.what, err)
		}
		out.Confirmed, out.NotAlive = confirmed, notAlive
		r.Logger.Info("key rotation step confirmed", "step", step.what, "generation", kr.Generation, "machines", len(confirmed))
	}
	return out, nil
}

func (r *Rotator) makeKey() ([]byte, error) {
	if r.NewKey != nil {
		return r.NewKey()
	}
	key := make([]byte, fsm.GossipKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("making a gossip key: %w", err)
	}
	return key, nil
}

// waitConfirmed waits until every registered machine that gossip shows
// alive gossips keyring generation gen or later.
func (r *Rotator) waitConfirmed(ctx context.Context, gen uint64) (confirmed, notAlive []string, err error) {
	timeout := r.StepTimeout
	if timeout == 0 {
		timeout = time.Minute
	}
	deadline := time.Now().Add(timeout)
	for {
		var lagging []string
		confirmed, notAlive, lagging = r.progress(gen)
		if len(lagging) == 0 {
			return confirmed, notAlive, nil
		}
		if time.Now().After(deadline) {
			return nil, nil, fmt.Errorf("%w: %v did not install keyring generation %d within %v; every machine still holds the old key: run rotate-key again once they are reachable", ErrNotConfirmed, lagging, gen, timeout)
		}
		select {
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("waiting for keyring generation %d: %w", gen, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// progress sorts the registered machines by whether they confirmed gen.
func (r *Rotator) progress(gen uint64) (confirmed, notAlive, lagging []string) {
	var machines []fsm.Machine
	r.Facts.Read(func(s *fsm.State) { machines = s.Machines() })
	members := map[string]cluster.Member{}
	for _, m := range r.Gossip.Members() {
		members[m.MachineID] = m
	}
	for _, m := range machines {
		g, ok := members[m.ID]
		switch {
		case m.State == fsm.MachineGone || !ok || g.Liveness != cluster.LivenessAlive:
			notAlive = append(notAlive, m.Name)
		case g.KeyGen >= gen:
			confirmed = append(confirmed, m.Name)
		default:
			lagging = append(lagging, m.Name)
		}
	}
	return confirmed, notAlive, lagging
}
