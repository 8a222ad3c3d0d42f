package cluster

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/drover-sh/drover/fsm"
)

// BenchmarkApply measures commands committed through a 3-machine cluster
// on loopback, proposed on a follower (so each one is forwarded), with 1
// and with 32 concurrent proposers. ns/op is the cost per command; the
// p50/p99 metrics are the latency of one command.
func BenchmarkApply(b *testing.B) {
	t := &testing.T{}
	tc := newTestCluster(t)
	defer func() {
		for _, n := range tc.nodes {
			if n != nil {
				n.Close()
			}
		}
	}()
	tc.t = t
	tc.startN(3)
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, _ := tc.nodes[0].Status()
		voters := 0
		for _, s := range st.Servers {
			if s.Voter {
				voters++
			}
		}
		if voters == 3 && st.LeaderID != "" {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("cluster did not form")
		}
		time.Sleep(50 * time.Millisecond)
	}
	follower := tc.nodes[(tc.leader()+1)%3]
	for _, proposers := range []int{1, 32} {
		b.Run(fmt.Sprintf("proposers=%d", proposers), func(b *testing.B) {
			var next atomic.Int64
			lat := make([]time.Duration, b.N)
			var wg sync.WaitGroup
			b.ResetTimer()
			for p := 0; p < proposers; p++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							return
						}
						start := time.Now()
						_, err := follower.Apply(b.Context(), fsm.AcquireLock{
							Namespace: fmt.Sprintf("ns-%d", i%64), Holder: "bench", Lease: time.Minute, At: start,
						})
						if err != nil {
							b.Error(err)
							return
						}
						lat[i] = time.Since(start)
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
