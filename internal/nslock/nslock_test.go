package nslock

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

func TestLeaseIsRenewedAndReleasedAndNamesTheHolder(t *testing.T) {
	st := facttest.NewStore()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	lease := 300 * time.Millisecond
	l, err := Acquire(context.Background(), st, "shop", "a/deploy/1", lease, quiet)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Acquire(context.Background(), st, "shop", "b/migrate/2", lease, quiet)
	var apiErr *ctlapi.APIError
	if !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeNamespaceLocked || !errors.Is(err, fsm.ErrLockHeld) || !strings.Contains(err.Error(), "locked by a/deploy/1") {
		t.Fatalf("second holder: %v", err)
	}
	// Held past its first lease: the renewal keeps it.
	time.Sleep(2 * lease)
	var lk fsm.Lock
	var held bool
	st.Read(func(s *fsm.State) { lk, held = s.Lock("shop") })
	if !held || lk.Holder != "a/deploy/1" || !lk.ExpiresAt.After(time.Now()) {
		t.Fatalf("after two leases: %+v held %v", lk, held)
	}
	l.Release()
	st.Read(func(s *fsm.State) { _, held = s.Lock("shop") })
	if held {
		t.Fatal("the lock is held after Release")
	}
	st.Fail = func(fsm.Command) error { return errors.New("no leader") }
	if _, err := Acquire(context.Background(), st, "shop", "a/deploy/3", lease, quiet); err == nil || !strings.Contains(err.Error(), "locking namespace shop: no leader") {
		t.Fatalf("acquire without a leader: %v", err)
	}
}
