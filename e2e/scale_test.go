package e2e

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// TestLabScale: DROVER_SCALE_HOSTS (default 20) lab hosts that run
// droverd only (no engine, no pool) join one cluster at once with a join
// token. Within two minutes every machine agrees on one leader, the
// voters are an odd number no greater than 5, seven machines are in the
// Raft configuration and every other one follows the facts from one of
// them with every machine registered; a minute later that still holds
// (no flapping).
func TestLabScale(t *testing.T) {
	requireLab(t)
	n := 20
	if v := os.Getenv("DROVER_SCALE_HOSTS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 3 {
			t.Fatalf("DROVER_SCALE_HOSTS=%q: want a number from 3", v)
		}
	}
	bin := binaries(t)
	l := lab.New(t, lab.Options{Hosts: n, Prefix: "dz"})
	h := l.Hosts
	d1 := startLabDaemon(t, bin, h[0], "--init", "--dns-addr", "")
	token := joinTokenFile(t, d1)
	daemons := []*labDaemon{d1}
	began := time.Now()
	for _, host := range h[1:] {
		daemons = append(daemons, startLabDaemon(t, bin, host, "--join-token-file", token, "--dns-addr", ""))
	}
	settled := func() error { return clusterFormed(daemons, n) }
	testpoll.Until(t, 2*time.Minute, fmt.Sprintf("%d machines in one cluster", n), settled)
	formed := time.Since(began)
	st, _ := d1.status()
	t.Logf("%d machines formed one cluster in %s: leader %s, %d voters, %d non-voters, %d observers", n, formed.Round(100*time.Millisecond), st.LeaderName, len(st.Voters), len(st.NonVoters), n-len(st.Voters)-len(st.NonVoters))
	for i := 0; i < 6; i++ {
		time.Sleep(10 * time.Second)
		if err := settled(); err != nil {
			t.Fatalf("%s after forming: %v", time.Duration(i+1)*10*time.Second, err)
		}
	}
	if st2, _ := d1.status(); st2.Term != st.Term {
		t.Fatalf("the term moved from %d to %d in a quiet minute: the leader did not hold", st.Term, st2.Term)
	}
}
