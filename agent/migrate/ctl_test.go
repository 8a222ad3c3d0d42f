package migrate

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

func TestPreviewSaysWhichChecksFail(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	// Neither the target nor the source has the image any more (its
	// registry has none): nothing could bring it.
	delete(c.m["b"].rt.images, testImage)
	delete(c.m["a"].rt.images, testImage)
	c.facts.Must(t, fsm.AcquireLock{Namespace: "shop", Holder: "a/deploy/x", Lease: time.Minute, At: time.Now()})
	plan, err := c.m["a"].mig.Preview(context.Background(), migrateTo("b"))
	if err != nil || plan.OK {
		t.Fatalf("preview %+v, %v", plan, err)
	}
	failed := map[string]string{}
	for _, ch := range plan.Checks {
		if !ch.OK {
			failed[ch.Name] = ch.Detail
		}
	}
	if !strings.Contains(failed["image on target"], "missing") || !strings.Contains(failed["namespace not locked"], "a/deploy/x") || len(failed) != 2 {
		t.Fatalf("failed checks %v", failed)
	}
	_, err = c.m["a"].mig.Migrate(context.Background(), migrateTo("b"), func(ctlapi.MigrationEvent) {})
	if !isCode(err, ctlapi.CodePreflightFailed) || !strings.Contains(err.Error(), "nothing moved") {
		t.Fatalf("apply with failing checks: %v", err)
	}
	if _, err := c.m["a"].mig.Preview(context.Background(), ctlapi.MigrateRequest{Service: "shop/nope", To: "b"}); !isCode(err, ctlapi.CodeUnknownService) {
		t.Fatalf("unknown service: %v", err)
	}
	if _, err := c.m["a"].mig.Preview(context.Background(), ctlapi.MigrateRequest{Service: "shop/web", To: "zz"}); !isCode(err, ctlapi.CodeUnknownMachine) {
		t.Fatalf("unknown machine: %v", err)
	}
}

func TestAbortAndPurgeAnswerByPhase(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	a := c.m["a"]
	ctx := context.Background()
	if _, err := a.mig.Abort(ctx, "nope"); !isCode(err, ctlapi.CodeUnknownMigration) {
		t.Fatalf("abort of nothing: %v", err)
	}
	// A migration stalled on its first stream is aborted by the operator.
	unblock := make(chan struct{})
	defer close(unblock)
	a.mig.cfg.StallTimeout = time.Hour
	var healed atomic.Bool // swapping the dependency would race a handler still starting
	a.mig.d.Streams = stallingStreams{Streams: a.vols, unblock: unblock, healed: &healed}
	done := make(chan error, 1)
	var id string
	started := make(chan struct{})
	go func() {
		_, err := a.mig.Migrate(ctx, migrateTo("b"), func(ev ctlapi.MigrationEvent) {
			if id == "" {
				id = ev.ID
				close(started)
			}
		})
		done <- err
	}()
	<-started
	if _, err := c.m["b"].mig.Abort(ctx, id); !isCode(err, ctlapi.CodeNotHere) {
		t.Fatalf("abort on another machine: %v", err)
	}
	info, err := a.mig.Abort(ctx, id)
	if err != nil || info.Phase != "aborted" || !strings.Contains(info.Error, "aborted by the operator") {
		t.Fatalf("abort %+v, %v", info, err)
	}
	if err := <-done; !isCode(err, ctlapi.CodeMigrationAborted) {
		t.Fatalf("the aborted migration answered %v", err)
	}
	if _, err := a.mig.Abort(ctx, id); !isCode(err, ctlapi.CodeEnded) {
		t.Fatalf("abort of an aborted migration: %v", err)
	}
	if _, err := a.mig.PurgeSource(ctx, id); !isCode(err, ctlapi.CodeNotDone) {
		t.Fatalf("purge of an aborted migration: %v", err)
	}

	healed.Store(true)
	moved, err := a.mig.Migrate(ctx, migrateTo("b"), func(ctlapi.MigrationEvent) {})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.mig.Abort(ctx, moved.ID); !isCode(err, ctlapi.CodeCommitted) {
		t.Fatalf("abort of a done migration: %v", err)
	}
	info, err = c.m["b"].mig.PurgeSource(ctx, moved.ID)
	if err != nil || info.SourcePurgedAt.IsZero() || a.vols.Exists(a.vols.Dataset("shop", "data")) {
		t.Fatalf("purge %+v, %v", info, err)
	}
	list, _ := a.mig.List(ctx)
	if len(list) != 2 || list[1].RetainedUntil != (time.Time{}) {
		t.Fatalf("list %+v", list)
	}
	if _, err := a.mig.Rollback(ctx, moved.ID, func(ctlapi.MigrationEvent) {}); !isCode(err, ctlapi.CodeNoRollback) || !strings.Contains(err.Error(), "purged") {
		t.Fatalf("rollback after a purge: %v", err)
	}
}

// A budget below a cutover's fixed cost fails pre-flight, naming the
// budget and where the fixed cost comes from; nothing moves.
func TestABudgetBelowTheFixedCostFailsPreflight(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	req := migrateTo("b")
	req.MaxDowntime = ctlapi.Duration(10 * time.Millisecond)
	plan, err := c.m["a"].mig.Preview(context.Background(), req)
	if err != nil || plan.OK || time.Duration(plan.PredictedDowntime) != defaultFixedCost || time.Duration(plan.MaxDowntime) != 10*time.Millisecond {
		t.Fatalf("preview %+v, %v", plan, err)
	}
	_, err = c.m["a"].mig.Migrate(context.Background(), req, func(ctlapi.MigrationEvent) {})
	if !isCode(err, ctlapi.CodePreflightFailed) || !strings.Contains(err.Error(), "downtime budget") || !strings.Contains(err.Error(), "default") {
		t.Fatalf("apply over the budget: %v", err)
	}
	if c.owner() != "a" {
		t.Fatalf("the service moved to %s", c.owner())
	}
	req.MaxDowntime = ctlapi.NoDowntimeBudget
	if plan, err := c.m["a"].mig.Preview(context.Background(), req); err != nil || !plan.OK || plan.MaxDowntime >= 0 {
		t.Fatalf("preview without a budget %+v, %v", plan, err)
	}
}
