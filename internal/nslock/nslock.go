// Package nslock holds a namespace lock of the fact store for as long as
// a deploy or a migration runs: taken once, renewed in the background at
// a third of its lease, released at the end. It is the one place that
// knows how the lock's lease is kept.
package nslock

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

// Applier proposes commands to the fact store.
type Applier interface {
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
}

// Lease is a held lock. Its renewal stops when ctx given to Acquire ends
// or Release is called.
type Lease struct {
	facts     Applier
	ns        string
	holder    string
	logger    *slog.Logger
	ctx       context.Context
	stopRenew context.CancelFunc
	renewDone chan struct{}
}

// Acquire takes the lock of namespace ns for holder, or says who holds it
// and for how long (ctlapi code namespace_locked). The lease is renewed
// until Release or until ctx ends.
func Acquire(ctx context.Context, facts Applier, ns, holder string, lease time.Duration, logger *slog.Logger) (*Lease, error) {
	_, err := facts.Apply(ctx, fsm.AcquireLock{Namespace: ns, Holder: holder, Lease: lease, At: time.Now()})
	var rule *fsm.RuleError
	if errors.As(err, &rule) && errors.Is(err, fsm.ErrLockHeld) {
		return nil, &ctlapi.APIError{Status: http.StatusConflict, Code: ctlapi.CodeNamespaceLocked, Err: &heldError{
			msg: fmt.Sprintf("namespace %q is locked by %s for %s: another deploy or migration is running there",
				ns, rule.Holder, time.Since(rule.Since).Round(time.Second)),
			rule: err}}
	}
	if err != nil {
		return nil, fmt.Errorf("locking namespace %s: %w", ns, err)
	}
	rctx, stop := context.WithCancel(ctx)
	l := &Lease{facts: facts, ns: ns, holder: holder, logger: logger, ctx: ctx, stopRenew: stop, renewDone: make(chan struct{})}
	go l.renew(rctx, lease)
	return l, nil
}

func (l *Lease) renew(ctx context.Context, lease time.Duration) {
	defer close(l.renewDone)
	tick := time.NewTicker(lease / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if _, err := l.facts.Apply(ctx, fsm.RenewLock{Namespace: l.ns, Holder: l.holder, Lease: lease, At: time.Now()}); err != nil && ctx.Err() == nil {
			l.logger.Warn("renewing namespace lock", "namespace", l.ns, "holder", l.holder, "err", err)
		}
	}
}

// Release stops the renewal and gives the lock up; if that fails, the
// lease runs out by itself. Safe to call more than once.
func (l *Lease) Release() {
	l.stopRenew()
	<-l.renewDone
	Release(context.WithoutCancel(l.ctx), l.facts, l.ns, l.holder, l.logger)
}

// Release gives up a lock held by holder, also one whose holder is gone
// (a migration nobody runs any more), within 10 s.
func Release(ctx context.Context, facts Applier, ns, holder string, logger *slog.Logger) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := facts.Apply(rctx, fsm.ReleaseLock{Namespace: ns, Holder: holder, At: time.Now()}); err != nil {
		logger.Warn("releasing the namespace lock; its lease will run out", "namespace", ns, "holder", holder, "err", err)
	}
}

// heldError says who holds the lock and is the fact store's ErrLockHeld.
type heldError struct {
	msg  string
	rule error
}

func (e *heldError) Error() string { return e.msg }
func (e *heldError) Unwrap() error { return e.rule }
