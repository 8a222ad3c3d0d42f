package agent

import (
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
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
