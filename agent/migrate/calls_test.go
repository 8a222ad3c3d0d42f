package migrate

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/fsm"
)

// Calls are checked against the migration's facts, and their refusals
// keep their identity on the caller's side.
func TestCallsRefuseWhatTheFactsDoNotAllow(t *testing.T) {
	c := newCluster(t, "a", "b", "c")
	c.deploy("a")
	c.orphan("m1", "b", "a/migrate/m1", fsm.PhaseWarmCopy)
	ctx := context.Background()
	b, x := c.m["b"], c.m["c"]
	ref := migrationRef{ID: "m1"}

	// Only the source may stream into the target: c is a member, not it.
	_, err := routeReceive.Call(ctx, x.host, "b", streamRequest{ID: "m1", Volume: "data", Snap: "drover-m1-2"}, strings.NewReader("junk"))
	if !errors.Is(err, ErrStreamRefused) {
		t.Fatalf("stream from a third machine: %v", err)
	}
	// Neither may a process that is no member at all, with a request that
	// is otherwise well formed.
	raw, _ := http.NewRequest(http.MethodPost, b.host.URL(routeReceive.Path), strings.NewReader("junk"))
	raw.Header.Set(peer.RequestHeader, `{"id":"m1","volume":"data","snap":"drover-m1-2"}`)
	resp, err := c.net.Raw().Do(raw)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode == 200 || !strings.Contains(string(body), `"code":"stream_refused"`) {
		t.Fatalf("a non-member's stream: %d %s", resp.StatusCode, body)
	}
	if _, err := routeStartTarget.Call(ctx, x.host, "a", ref); !errors.Is(err, ErrNotTarget) {
		t.Fatalf("start-target on the source: %v", err)
	}
	if _, err := routeStopSource.Call(ctx, x.host, "b", ref); !errors.Is(err, ErrNotSource) {
		t.Fatalf("stop-source on the target: %v", err)
	}
	if _, err := routeCleanupSource.Call(ctx, x.host, "a", ref); !errors.Is(err, ErrNotCommitted) {
		t.Fatalf("cleanup before the commit: %v", err)
	}
	if _, err := routePurgeSource.Call(ctx, x.host, "a", ref); !errors.Is(err, ErrNotDone) {
		t.Fatalf("purge of a running migration: %v", err)
	}
	if _, err := routeStopSource.Call(ctx, x.host, "a", migrationRef{ID: "nope"}); !errors.Is(err, ErrNoMigration) {
		t.Fatalf("unknown migration: %v", err)
	}
}

// A machine without a ZFS parent answers pre-flight questions, and says
// it holds no volumes when asked to take one.
func TestLocalFactsOfAMachineWithoutVolumes(t *testing.T) {
	c := newCluster(t, "a", "b")
	c.deploy("a")
	b := c.m["b"]
	b.mig.d.Streams, b.mig.d.Datasets, b.mig.d.Copies = nil, nil, nil
	lf, err := c.m["a"].mig.LocalFacts(context.Background(), "b", LocalQuery{Namespace: "shop", Volumes: []string{"data"}, Images: []string{testImage, "other:2"}})
	if err != nil || lf.HoldsVolumes || !lf.Images[testImage] || lf.Images["other:2"] || lf.MemoryBytes != 2<<30 {
		t.Fatalf("local facts %+v, %v", lf, err)
	}
	lf, err = c.m["b"].mig.LocalFacts(context.Background(), "a", ServiceQuery(c.service()))
	if err != nil || !lf.HoldsVolumes || lf.Volumes["data"].Dataset == "" {
		t.Fatalf("source's local facts %+v, %v", lf, err)
	}
}
