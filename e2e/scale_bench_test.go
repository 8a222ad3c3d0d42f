package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/lab"
)

// BenchmarkScale measures a cluster of N lab hosts that run droverd only
// (no engine, no pool), production timing, all joining at once with a
// join token (`make bench`, bench/results/scale.md): time to form, voters,
// the leader's and the others' idle CPU and memory, how long until a
// cut-off machine is shown failed, commit latency from a follower.
// DROVER_SCALE_SIZES (default "10,50,100") are the sizes;
// DROVER_SCALE_QUIET (a duration) leaves the largest cluster alone that
// long and reports its CPU and false failures over all of it.
func BenchmarkScale(b *testing.B) {
	if os.Getenv("DROVER_BENCH") == "" {
		b.Skip("the lab benchmarks run with DROVER_BENCH=1 (make bench)")
	}
	requireLab(b)
	var sizes []int
	for _, s := range strings.Split(envOr("DROVER_SCALE_SIZES", "10,50,100"), ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 3 {
			b.Fatalf("DROVER_SCALE_SIZES: %q is not a number of machines from 3", s)
		}
		sizes = append(sizes, n)
	}
	report := &benchReport{Name: "scale", Heading: "drover at scale on the lab", Started: time.Now(), Machine: machineFacts(binaries(b))}
	report.Machine["timing"] = "production defaults (Raft heartbeat 1s; memberlist LAN profile, probe 700 ms, suspicion multiplier 2)"
	t := &table{
		Title: "A cluster of N machines",
		How: "N lab hosts (network namespaces on this one 2-core machine) run droverd only; the first inits, the others start at once with a join token. " +
			"Formed: until every machine sees one leader, an odd number of voters (at most 5), min(N, 7) machines in the Raft configuration and every other machine following the facts from one of them (an observer) with all N registered (or 5 minutes). " +
			"CPU and RSS: 3 windows of 10 s after forming, % of one core; the leader's, the median of the other Raft servers and the median of the observers. " +
			"False failed: machines shown failed by any machine's gossip while the cluster is quiet in those 40 s (every machine's log; DROVER_SCALE_QUIET adds a longer window, in its own table). " +
			"Cut → failed: an observer's (else a non-voter's) link is taken down, and a voter's `machine ls` is read every 20 ms until it shows it failed; up to five observers one after the other, median (min–max). " +
			"Commit: `cluster probe` (200 entries, 1 proposer) p50, on a voter that does not lead and on an observer.",
		Header: []string{"machines", "formed (s)", "voters", "observers", "leader CPU (%)", "servers CPU (%)", "observers CPU (%)", "leader RSS (MiB)", "servers RSS (MiB)", "observers RSS (MiB)",
			"false failed", "cut → failed (s)", "voter commit p50 (ms)", "observer commit p50 (ms)"},
	}
	quiet := &table{
		Title: "Idle over the whole quiet window (DROVER_SCALE_QUIET)",
		How: "The largest cluster, right after the 3 windows above, left alone for DROVER_SCALE_QUIET: each daemon's CPU over all of it, % of one core " +
			"(the leader's, the median and the highest of the other Raft servers and of the observers), and machines shown failed by any machine's gossip in it.",
		Header: []string{"machines", "quiet", "leader CPU (%)", "servers CPU (%) median", "servers CPU (%) max", "observers CPU (%) median", "observers CPU (%) max", "false failed"},
	}
	rowOf := map[int]int{} // size → its row
	for _, n := range sizes {
		b.Run(fmt.Sprintf("%d-hosts", n), func(b *testing.B) {
			row, quietRow := scaleRun(b, n, n == slices.Max(sizes))
			rowOf[n] = len(t.Rows)
			t.add(row...)
			if quietRow != nil {
				quiet.add(quietRow...)
			}
		})
	}
	lo, hi := slices.Min(sizes), slices.Max(sizes)
	rowLo, okLo := rowOf[lo]
	rowHi, okHi := rowOf[hi]
	if lo < hi && okLo && okHi {
		t.growth(fmt.Sprintf("%d_vs_%d", hi, lo), fmt.Sprintf("growth %d → %d", lo, hi), rowLo, rowHi)
		t.How += fmt.Sprintf(" The last row is each figure at %d machines over the same at %d (medians, one run).", hi, lo)
	}
	report.Sections = append(report.Sections, t)
	if len(quiet.Rows) > 0 {
		report.Sections = append(report.Sections, quiet)
	}
	report.Took = time.Since(report.Started).Round(time.Second).String()
	if err := report.write(envOr("DROVER_BENCH_OUT", "../bench/results")); err != nil {
		b.Fatal(err)
	}
}

// scaleRun forms one cluster of n and measures it: the row's cells, and
// those of the quiet window's when DROVER_SCALE_QUIET is set and
// withQuiet (the largest size).
func scaleRun(b *testing.B, n int, withQuiet bool) (row, quietRow []string) {
	bin := binaries(b)
	l := lab.New(b, lab.Options{Hosts: n, Prefix: "bz"})
	h := l.Hosts
	flags := append([]string{"--dns-addr", ""}, productionFlags...)
	d1 := startLabDaemon(b, bin, h[0], append([]string{"--init"}, flags...)...)
	token := joinTokenFile(b, d1)
	daemons := []*labDaemon{d1}
	began := time.Now()
	for _, host := range h[1:] {
		daemons = append(daemons, startLabDaemon(b, bin, host, append([]string{"--join-token-file", token}, flags...)...))
	}
	row = []string{strconv.Itoa(n)}
	var st ctlapi.ClusterStatus
	formed := false
	for time.Since(began) < 5*time.Minute {
		if err := clusterFormed(daemons, n); err == nil {
			formed = true
			break
		}
		time.Sleep(time.Second)
	}
	if !formed {
		err := clusterFormed(daemons, n)
		dir := filepath.Join(os.TempDir(), fmt.Sprintf("drover-scale-%d-logs", n))
		if err := os.MkdirAll(dir, 0o755); err == nil {
			for _, d := range daemons {
				if raw, err := os.ReadFile(d.proc.LogPath()); err == nil {
					_ = os.WriteFile(filepath.Join(dir, d.host.Name+".log"), raw, 0o644)
				}
			}
		}
		b.Logf("%d machines: not formed after 5 minutes: %v (every daemon's log in %s)", n, err, dir)
		return append(row, "not within 300", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"), nil
	}
	row = append(row, fmt.Sprintf("%.1f", time.Since(began).Seconds()))
	st, _ = d1.status()
	row = append(row, strconv.Itoa(len(st.Voters)), strconv.Itoa(n-len(st.Voters)-len(st.NonVoters)))
	servers := map[string]bool{}
	for _, s := range append(slices.Clone(st.Voters), st.NonVoters...) {
		servers[s.Name] = true
	}
	var leader *labDaemon
	var others []*labDaemon
	for _, d := range daemons {
		if d.host.Name == st.LeaderName {
			leader = d
		} else {
			others = append(others, d)
		}
	}
	if leader == nil {
		b.Fatalf("leader %q is none of the lab's daemons", st.LeaderName)
	}
	failedBefore := failedSeen(daemons)
	var anObserver *labDaemon
	for _, d := range others {
		if !servers[d.host.Name] && anObserver == nil {
			anObserver = d
		}
	}
	profile(b, n, 10*time.Second, map[string]*labDaemon{"leader": leader, "observer": anObserver})
	cpu := map[*labDaemon][]float64{}
	rss := map[*labDaemon][]float64{}
	before := map[*labDaemon]float64{}
	for _, d := range daemons {
		before[d] = cpuSeconds(b, d.proc.PID())
	}
	for range 3 {
		time.Sleep(10 * time.Second)
		for _, d := range daemons {
			now := cpuSeconds(b, d.proc.PID())
			cpu[d] = append(cpu[d], 100*(now-before[d])/10)
			before[d] = now
			rss[d] = append(rss[d], float64(rssKiB(d.proc.PID()))/1024)
		}
	}
	// of gives the median (or highest) over the other servers or the
	// observers of each one's median in of.
	of := func(server, highest bool, in map[*labDaemon][]float64, format string) string {
		var xs []float64
		for _, d := range others {
			if servers[d.host.Name] == server {
				xs = append(xs, newFigure(in[d]).Median)
			}
		}
		if len(xs) == 0 {
			return "-"
		}
		if highest {
			return fmt.Sprintf(format, slices.Max(xs))
		}
		return fmt.Sprintf(format, newFigure(xs).Median)
	}
	falseFailed := failedSeen(daemons) - failedBefore
	if v := os.Getenv("DROVER_SCALE_QUIET"); v != "" && withQuiet {
		extra, err := time.ParseDuration(v)
		if err != nil {
			b.Fatalf("DROVER_SCALE_QUIET=%q: %v", v, err)
		}
		quietFrom := failedSeen(daemons)
		long := map[*labDaemon][]float64{}
		for _, d := range daemons {
			before[d] = cpuSeconds(b, d.proc.PID())
		}
		time.Sleep(extra)
		for _, d := range daemons {
			long[d] = []float64{100 * (cpuSeconds(b, d.proc.PID()) - before[d]) / extra.Seconds()}
		}
		quietFailed := failedSeen(daemons) - quietFrom
		quietRow = []string{strconv.Itoa(n), extra.String(), fmt.Sprintf("%.2f", long[leader][0]), of(true, false, long, "%.2f"), of(true, true, long, "%.2f"),
			of(false, false, long, "%.2f"), of(false, true, long, "%.2f"), strconv.Itoa(quietFailed)}
		b.Logf("%d machines, quiet %s: %v", n, extra, quietRow)
	}
	row = append(row, fmt.Sprintf("%.2f", newFigure(cpu[leader]).Median), of(true, false, cpu, "%.2f"), of(false, false, cpu, "%.2f"),
		fmt.Sprintf("%.0f", newFigure(rss[leader]).Median), of(true, false, rss, "%.0f"), of(false, false, rss, "%.0f"), fmt.Sprintf("%d in 40s", falseFailed))

	// An observer (else a non-voter) cut off; a voter that does not lead
	// watches.
	voters := map[string]bool{}
	for _, v := range st.Voters {
		voters[v.Name] = true
	}
	var watcher, observer *labDaemon
	for _, d := range others {
		switch {
		case !servers[d.host.Name] && observer == nil:
			observer = d
		case voters[d.host.Name] && watcher == nil:
			watcher = d
		}
	}
	// Five cuts, each of another machine once the previous one is back.
	var cuts []*labDaemon
	for _, d := range others {
		if !servers[d.host.Name] && len(cuts) < 5 {
			cuts = append(cuts, d)
		}
	}
	for _, d := range others {
		if len(cuts) == 0 && !voters[d.host.Name] {
			cuts = append(cuts, d)
		}
	}
	shows := func(name, liveness string) bool {
		ms, err := client(watcher).Machines(context.Background())
		return err == nil && slices.ContainsFunc(ms, func(m ctlapi.Machine) bool { return m.Name == name && m.Liveness == liveness })
	}
	var detected []float64
	for _, cut := range cuts {
		if watcher == nil {
			break
		}
		l.SetLinkUp(cut.host, false)
		down := time.Now()
		detected = append(detected, pollFast(b, cut.host.Name+" shown failed", down, 20*time.Millisecond, func() bool { return shows(cut.host.Name, "failed") }))
		l.SetLinkUp(cut.host, true)
		pollFast(b, cut.host.Name+" shown alive again", time.Now(), 100*time.Millisecond, func() bool { return shows(cut.host.Name, "alive") })
	}
	if len(detected) > 0 {
		f := newFigure(detected)
		row = append(row, fmt.Sprintf("%.2f (%.2f–%.2f)", f.Median, slices.Min(detected), slices.Max(detected)))
	} else {
		row = append(row, "-")
	}
	for _, d := range []*labDaemon{watcher, observer} {
		if d == nil {
			row = append(row, "-")
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		r, err := client(d).Probe(ctx, ctlapi.ProbeRequest{Proposers: 1, Count: 200})
		cancel()
		if err != nil {
			b.Fatalf("probe on %s: %v", d.host.Name, err)
		}
		row = append(row, fmt.Sprintf("%.2f", ms(time.Duration(r.P50))))
	}
	b.Logf("%d machines: %v", n, row)
	return row, quietRow
}

// profile samples where the CPU of the leader and of one observer goes
// for d with perf, when the machine has it, into
// DROVER_BENCH_OUT/scale-{leader,observer}-N.txt (functions by their
// own share of samples); else it only waits d. It runs before the CPU
// windows, so its own cost is not in them.
func profile(b *testing.B, n int, d time.Duration, who map[string]*labDaemon) {
	perf, err := exec.LookPath("perf")
	if err != nil {
		time.Sleep(d)
		return
	}
	dir := envOr("DROVER_BENCH_OUT", "../bench/results")
	_ = os.MkdirAll(dir, 0o755)
	var wg sync.WaitGroup
	for role, daemon := range who {
		if daemon == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := filepath.Join(b.TempDir(), role+".data")
			rec := exec.Command(perf, "record", "-q", "-F", "999", "-g", "-o", data, "-p", strconv.Itoa(daemon.proc.PID()), "--", "sleep", strconv.Itoa(int(d.Seconds())))
			if out, err := rec.CombinedOutput(); err != nil {
				b.Logf("perf record: %v: %s", err, out)
				return
			}
			// With children: a function's share includes what it calls, so
			// the loops of each part (Raft, memberlist, WireGuard, the
			// agent's) show with what they cost in all.
			out, err := exec.Command(perf, "report", "-q", "-i", data, "--stdio", "--children", "--sort", "sym", "-g", "none", "--percent-limit", "2").Output()
			if err != nil {
				b.Logf("perf report: %v", err)
				return
			}
			head := fmt.Sprintf("# where the %s's CPU goes (%s), %d machines idle: perf over %s, samples by function, with what it calls\n\n", role, daemon.host.Name, n, d)
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("scale-%s-%d.txt", role, n)), append([]byte(head), out...), 0o644); err != nil {
				b.Logf("writing the profile: %v", err)
			}
		}()
	}
	wg.Wait()
}

// failedSeen counts the times any daemon's gossip has shown a machine
// failed, from their logs.
func failedSeen(daemons []*labDaemon) int {
	n := 0
	for _, d := range daemons {
		b, _ := os.ReadFile(d.proc.LogPath())
		n += strings.Count(string(b), `msg="machine failed"`)
	}
	return n
}

// clusterFormed tells whether every daemon sees one leader, the odd
// number of voters the cluster aims at (5 from 5 machines) and min(n, 7)
// machines in Raft, and whether every
// other machine follows the facts from a server (an observer) with all n
// machines registered in them.
func clusterFormed(daemons []*labDaemon, n int) error {
	leader := ""
	wantServers := min(n, cluster.DefaultMaxServers)
	wantVoters := 5 // an odd number, at most 5: 1 for 1–2 machines, 3 for 3–4
	switch {
	case n <= 2:
		wantVoters = 1
	case n <= 4:
		wantVoters = 3
	}
	var observers []*labDaemon
	for _, d := range daemons {
		st, err := d.status()
		if err != nil {
			return err
		}
		if st.LeaderName == "" || (leader != "" && st.LeaderName != leader) {
			return fmt.Errorf("%s sees leader %q, another %q", d.host.Name, st.LeaderName, leader)
		}
		leader = st.LeaderName
		if v := len(st.Voters); v != wantVoters {
			return fmt.Errorf("%s sees %d voters, want %d", d.host.Name, v, wantVoters)
		}
		if got := len(st.Voters) + len(st.NonVoters); got != wantServers {
			return fmt.Errorf("%s sees %d machines in Raft, want %d", d.host.Name, got, wantServers)
		}
		switch st.Role {
		case cluster.RoleLeader, cluster.RoleFollower, cluster.RoleNonvoter:
		case cluster.RoleObserver:
			if st.Follows == "" {
				return fmt.Errorf("%s observes but follows no server", d.host.Name)
			}
			observers = append(observers, d)
		default:
			return fmt.Errorf("%s is %s", d.host.Name, st.Role)
		}
	}
	if len(observers) != n-wantServers {
		return fmt.Errorf("%d observers, want %d", len(observers), n-wantServers)
	}
	for _, d := range observers {
		ms, err := client(d).Machines(context.Background())
		if err != nil {
			return err
		}
		registered := 0
		for _, m := range ms {
			if m.State != "joining" {
				registered++
			}
		}
		if registered != n {
			return fmt.Errorf("observer %s has %d of %d machines in its facts", d.host.Name, registered, n)
		}
	}
	return nil
}
