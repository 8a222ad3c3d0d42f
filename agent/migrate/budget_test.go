package migrate

import (
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/fsm"
)

func TestFixedCostComesFromTheNewestMoveOfTheServiceElseAnyElseTheDefault(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	done := func(id, svc string, ended time.Time, total, send time.Duration) fsm.Migration {
		return fsm.Migration{ID: id, Namespace: "shop", Service: svc, Phase: fsm.PhaseDone, EndedAt: ended,
			Cutover: &fsm.Cutover{Total: total, FinalSend: send}}
	}
	if d, from := fixedCost(nil, "shop", "web"); d != defaultFixedCost || !strings.Contains(from, "default") {
		t.Fatalf("no moves: %s from %q", d, from)
	}
	moves := []fsm.Migration{
		done("m1", "db", t0.Add(3*time.Hour), 900*time.Millisecond, 100*time.Millisecond),
		done("m2", "web", t0.Add(time.Hour), 700*time.Millisecond, 200*time.Millisecond),
		done("m3", "web", t0.Add(2*time.Hour), 600*time.Millisecond, 250*time.Millisecond),
		{ID: "m4", Namespace: "shop", Service: "web", Phase: fsm.PhaseAborted, EndedAt: t0.Add(4 * time.Hour), Cutover: &fsm.Cutover{Total: time.Hour}},
	}
	if d, from := fixedCost(moves, "shop", "web"); d != 350*time.Millisecond || !strings.Contains(from, "m3") {
		t.Fatalf("own moves: %s from %q, want 350ms from m3", d, from)
	}
	if d, from := fixedCost(moves, "shop", "cache"); d != 800*time.Millisecond || !strings.Contains(from, "m1") || !strings.Contains(from, "shop/db") {
		t.Fatalf("others' moves: %s from %q, want 800ms from m1", d, from)
	}
}

func TestBudgetOfARequest(t *testing.T) {
	if budgetOf(0) != time.Duration(ctlapi.DefaultMaxDowntime) || budgetOf(ctlapi.NoDowntimeBudget) != 0 || budgetOf(ctlapi.Duration(time.Second)) != time.Second {
		t.Fatal("budgets: zero is the default, negative none, others themselves")
	}
}

func TestWarmPlan(t *testing.T) {
	const mib = 1 << 20
	second := time.Second
	type round struct {
		sent uint64
		took time.Duration
		want warmStep
	}
	cases := []struct {
		name   string
		budget time.Duration
		rounds []round
	}{
		{"a small first round fits at once", 5 * second, []round{{2 * mib, 100 * time.Millisecond, warmDone}}},
		{"converging rounds go on until small", 5 * second, []round{
			{1024 * mib, 10 * second, warmAgain}, {100 * mib, second, warmAgain}, {10 * mib, 100 * time.Millisecond, warmAgain}, {4 * mib, 40 * time.Millisecond, warmDone}}},
		{"rounds that stop shrinking within the budget end the warm copy", 5 * second, []round{
			{1024 * mib, 10 * second, warmAgain}, {200 * mib, 2 * second, warmAgain}, {190 * mib, 2 * second, warmDone}}},
		{"rounds that stop shrinking over the budget give up", 500 * time.Millisecond, []round{
			{1024 * mib, 10 * second, warmAgain}, {200 * mib, 2 * second, warmAgain}, {190 * mib, 2 * second, warmGiveUp}}},
		{"no budget never gives up", 0, []round{
			{1024 * mib, 10 * second, warmAgain}, {200 * mib, 2 * second, warmAgain}, {190 * mib, 2 * second, warmDone}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := warmPlan{fixed: 300 * time.Millisecond, budget: c.budget}
			var prior uint64
			for i, r := range c.rounds {
				got, predicted := p.next(warmRound{n: i + 1, sent: r.sent, took: r.took, prior: prior})
				if got != r.want {
					t.Fatalf("round %d (%d MiB in %s): step %d, want %d (predicted %s)", i+1, r.sent/mib, r.took, got, r.want, predicted)
				}
				prior = r.sent
			}
		})
	}
	// The prediction: fixed cost plus the last round at the best rate.
	p := warmPlan{fixed: 300 * time.Millisecond, budget: time.Minute}
	p.next(warmRound{n: 1, sent: 100 * mib, took: second})
	if _, predicted := p.next(warmRound{n: 2, sent: 50 * mib, took: second, prior: 100 * mib}); predicted != 800*time.Millisecond {
		t.Fatalf("predicted %s, want 300ms + 50 MiB at 100 MiB/s = 800ms", predicted)
	}
	// Bounded: the last round allowed ends the warm copy either way.
	p = warmPlan{fixed: 300 * time.Millisecond, budget: 400 * time.Millisecond}
	if step, _ := p.next(warmRound{n: maxWarmRounds, sent: 100 * mib, took: second, prior: 1000 * mib}); step != warmGiveUp {
		t.Fatalf("the last round over the budget: step %d", step)
	}
}
