package migrate

import (
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

// The downtime budget: a move predicts its downtime after every warm
// round — the fixed cost of a cutover plus the final increment's send —
// and goes on copying while it runs until the prediction fits the budget.
// A move that stops converging with the prediction over the budget ends
// before the source stops. See DESIGN.md, "Downtime budget".

const (
	// maxWarmRounds bounds the warm rounds of one move.
	maxWarmRounds = 8
	// warmEnough: a round smaller than this ends the warm copy once the
	// prediction fits; its final increment is a fraction of a second.
	warmEnough = 8 << 20
	// defaultFixedCost is the fixed cost of a cutover predicted before any
	// move of the cluster measured one.
	defaultFixedCost = time.Second
)

// fixedCost estimates a cutover's fixed cost — everything but the final
// increment's send — from the newest done move that recorded its
// breakdown: of the same service if there is one, else of any service.
// It says where the figure comes from.
func fixedCost(moves []fsm.Migration, namespace, service string) (time.Duration, string) {
	var same, any *fsm.Migration
	for i := range moves {
		m := &moves[i]
		if m.Phase != fsm.PhaseDone || m.Cutover == nil {
			continue
		}
		if any == nil || m.EndedAt.After(any.EndedAt) {
			any = m
		}
		if m.Namespace == namespace && m.Service == service && (same == nil || m.EndedAt.After(same.EndedAt)) {
			same = m
		}
	}
	switch {
	case same != nil:
		return cutoverFixedCost(*same.Cutover), "the last move of this service, " + same.ID
	case any != nil:
		return cutoverFixedCost(*any.Cutover), "the last move in the cluster, " + any.ID + " of " + any.Namespace + "/" + any.Service
	}
	return defaultFixedCost, "no earlier move: drover's default"
}

// cutoverFixedCost is what a cutover took besides its final send.
func cutoverFixedCost(c fsm.Cutover) time.Duration { return max(c.Total-c.FinalSend, 0) }

// budgetOf is a request's downtime budget; zero or less is none.
func budgetOf(d ctlapi.Duration) time.Duration {
	switch {
	case d == 0:
		return time.Duration(ctlapi.DefaultMaxDowntime)
	case d < 0:
		return 0
	}
	return time.Duration(d)
}

// warmStep is what follows a warm round.
type warmStep int

const (
	warmAgain  warmStep = iota // copy another round while the service runs
	warmDone                   // stop the source: the final increment fits
	warmGiveUp                 // end the move: the budget cannot be met
)

// warmRound is what one round measured.
type warmRound struct {
	n     int           // 1 for the first round
	sent  uint64        // bytes, all volumes
	took  time.Duration // the round's sends
	prior uint64        // the bytes of the round before (0 for the first)
}

// warmPlan decides, after each round, whether to go on: a pure function
// of what the rounds measured.
type warmPlan struct {
	fixed  time.Duration
	budget time.Duration // <= 0: none
	rate   float64       // bytes/s: the best a round reached
}

// next records a round and decides what follows, with the downtime it
// predicts if the source stopped now: the fixed cost plus the last
// round's bytes (about what the next increment carries) at the measured
// rate.
func (p *warmPlan) next(r warmRound) (warmStep, time.Duration) {
	if r.took > 0 && r.sent > 0 {
		p.rate = max(p.rate, float64(r.sent)/r.took.Seconds())
	}
	predicted := p.fixed
	if p.rate > 0 {
		predicted += time.Duration(float64(r.sent) / p.rate * float64(time.Second))
	}
	fits := p.budget <= 0 || predicted <= p.budget
	// Converging: each round sends clearly less than the one before.
	shrinking := r.n == 1 || r.sent < r.prior*3/4
	switch {
	case fits && (r.sent < warmEnough || !shrinking || r.n >= maxWarmRounds):
		return warmDone, predicted
	case !fits && (!shrinking || r.n >= maxWarmRounds):
		return warmGiveUp, predicted
	}
	return warmAgain, predicted
}
