// Package probe measures the fact store live: it commits no-op entries
// (fsm.Probe) through the very path real commands take and times each.
package probe

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

// Limits of one probe run: enough to saturate the store, not enough to
// flood a production log by a typo.
const (
	maxProbeProposers = 256
	maxProbeCount     = 100_000
)

// Applier proposes commands to the fact store (cluster.Node).
type Applier interface {
	Apply(ctx context.Context, cmd fsm.Command) (json.RawMessage, error)
}

// Run commits req.Count no-op entries (fsm.Probe) through the fact store
// from req.Proposers concurrent proposers on this machine (self, named
// name) and times each one: proposal here, forwarding to the leader when
// this machine is not it, replication over the mesh, applied here.
// Entries that fail (no leader, timeout) are counted, not retried, so a
// run during an election shows the election. The result's Leader is the
// caller's to fill.
func Run(ctx context.Context, f Applier, self, name string, req ctlapi.ProbeRequest) (ctlapi.ProbeResult, error) {
	if req.Proposers == 0 {
		req.Proposers = 1
	}
	if req.Count == 0 {
		req.Count = 100
	}
	if req.Timeout == 0 {
		req.Timeout = ctlapi.Duration(5 * time.Second)
	}
	bad := func(format string, args ...any) (ctlapi.ProbeResult, error) {
		return ctlapi.ProbeResult{}, &ctlapi.APIError{Status: http.StatusBadRequest, Code: ctlapi.CodeBadRequest, Err: fmt.Errorf(format, args...)}
	}
	switch {
	case req.Proposers < 0 || req.Proposers > maxProbeProposers:
		return bad("proposers %d is not in [1, %d]", req.Proposers, maxProbeProposers)
	case req.Count < 0 || req.Count > maxProbeCount:
		return bad("count %d is not in [1, %d]", req.Count, maxProbeCount)
	case req.Timeout < 0:
		return bad("timeout %v is negative", time.Duration(req.Timeout))
	}

	var (
		next     atomic.Int64
		mu       sync.Mutex
		lat      = make([]time.Duration, 0, req.Count)
		failed   int
		firstErr error
		wg       sync.WaitGroup
	)
	start := time.Now()
	for range req.Proposers {
		wg.Go(func() {
			for {
				seq := next.Add(1)
				if seq > int64(req.Count) || ctx.Err() != nil {
					return
				}
				cctx, cancel := context.WithTimeout(ctx, time.Duration(req.Timeout))
				began := time.Now()
				_, err := f.Apply(cctx, fsm.Probe{Machine: self, Seq: uint64(seq), At: began})
				took := time.Since(began)
				cancel()
				mu.Lock()
				if err != nil {
					failed++
					if firstErr == nil {
						firstErr = err
					}
				} else {
					lat = append(lat, took)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := ctx.Err(); err != nil {
		return ctlapi.ProbeResult{}, fmt.Errorf("probe cut short after %d entries: %w", len(lat)+failed, err)
	}

	out := ctlapi.ProbeResult{
		Machine: name, Proposers: req.Proposers, Committed: len(lat), Failed: failed,
		Elapsed: ctlapi.Duration(elapsed), PerSecond: float64(len(lat)) / elapsed.Seconds(),
	}
	if firstErr != nil {
		out.FirstError = firstErr.Error()
	}
	slices.Sort(lat)
	out.P50, out.P90, out.P99 = percentile(lat, 50), percentile(lat, 90), percentile(lat, 99)
	if len(lat) > 0 {
		out.Max = ctlapi.Duration(lat[len(lat)-1])
	}
	return out, nil
}

// percentile is the nearest-rank percentile p of sorted durations (0 when
// there are none).
func percentile(sorted []time.Duration, p int) ctlapi.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := (p*len(sorted) + 99) / 100 // ceil(p/100 · n)
	return ctlapi.Duration(sorted[max(rank, 1)-1])
}
