package probe

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/internal/facttest"
)

func TestPercentileNearestRank(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	var hundred []time.Duration
	for i := 1; i <= 100; i++ {
		hundred = append(hundred, ms(i))
	}
	for _, c := range []struct {
		sorted []time.Duration
		p      int
		want   time.Duration
	}{
		{nil, 50, 0},
		{[]time.Duration{ms(7)}, 99, ms(7)},
		{[]time.Duration{ms(1), ms(2)}, 50, ms(1)},
		{[]time.Duration{ms(1), ms(2), ms(3)}, 50, ms(2)},
		{hundred, 50, ms(50)},
		{hundred, 99, ms(99)},
		{hundred, 100, ms(100)},
		{hundred[:10], 99, ms(10)},
	} {
		if got := percentile(c.sorted, c.p); got != ctlapi.Duration(c.want) {
			t.Errorf("p%d of %d values = %v, want %v", c.p, len(c.sorted), time.Duration(got), c.want)
		}
	}
}

func TestRunCommitsAndCountsFailures(t *testing.T) {
	st := facttest.NewStore()
	st.AddMachine(t, "a", "a")
	res, err := Run(context.Background(), st, "a", "a", ctlapi.ProbeRequest{Proposers: 4, Count: 40})
	if err != nil || res.Committed != 40 || res.Failed != 0 || res.Machine != "a" || res.P99 < res.P50 || res.Max < res.P99 {
		t.Fatalf("probe %+v, %v", res, err)
	}
	st.Fail = func(fsm.Command) error { return errors.New("no leader") }
	res, err = Run(context.Background(), st, "a", "a", ctlapi.ProbeRequest{Count: 3})
	if err != nil || res.Failed != 3 || res.FirstError != "no leader" {
		t.Fatalf("probe without a leader %+v, %v", res, err)
	}
	for _, bad := range []ctlapi.ProbeRequest{{Proposers: 1000}, {Count: -1}, {Timeout: -1}} {
		if _, err := Run(context.Background(), st, "a", "a", bad); err == nil {
			t.Errorf("probe %+v accepted", bad)
		}
	}
}
