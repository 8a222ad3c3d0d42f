package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// BenchmarkLab measures drover on a lab of real hosts (network namespaces
// with their own ZFS pool, Docker engine and droverd, joined over a
// WireGuard mesh) and compares it with the alternatives, side by side in
// the same run. It writes bench/results/lab.md and lab.json. Run it with
// `make bench`; it is not part of `make test` and asserts no timing.
//
// The daemons run with production timing (no --lab-timing), so failover
// and failure detection are what an operator gets.
//
// DROVER_BENCH_RUNS (default 3) runs each migration measurement; the
// cheaper ones run at least 5 times. DROVER_BENCH_SIZES (MiB, default
// "64,256,1024") are the volume sizes of the downtime comparison.
// DROVER_BENCH_ONLY picks sections: factstore, throughput, downtime,
// restart, failover, trust (with factstore and failover), footprint
// (comma-separated; default all).
func BenchmarkLab(b *testing.B) {
	if os.Getenv("DROVER_BENCH") == "" {
		b.Skip("the lab benchmarks run with DROVER_BENCH=1 (make bench)")
	}
	requireLab(b)
	runs := envInt(b, "DROVER_BENCH_RUNS", 3)
	var sizes []int
	for _, s := range strings.Split(envOr("DROVER_BENCH_SIZES", "64,256,1024"), ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			b.Fatalf("DROVER_BENCH_SIZES: %q is not a size in MiB", s)
		}
		sizes = append(sizes, n)
	}
	only := strings.Split(os.Getenv("DROVER_BENCH_ONLY"), ",")
	want := func(section string) bool { return only[0] == "" || slices.Contains(only, section) }
	out := envOr("DROVER_BENCH_OUT", filepath.Join("..", "bench", "results"))
	report := &benchReport{Started: time.Now(), Machine: machineFacts(binaries(b))}
	report.Machine["timing"] = "production defaults (Raft heartbeat 1s, memberlist LAN profile)"

	footprint := &table{
		Title:  "Footprint, idle",
		How:    "`droverd` resident memory (VmRSS) and CPU (user+system, with the commands it runs such as `zfs`, over 3 windows of 10 s, % of one core) of every host's daemon, after the cluster formed and settled, no services running; median of the hosts, (min–max) over hosts.",
		Header: []string{"lab", "RSS per host (MiB)", "CPU per host (% of one core)"},
	}
	var guarded, open trustRun
	b.Run("3-hosts", func(b *testing.B) {
		// Room for a 1 GiB volume, its writes, and a second copy while it moves.
		b.Setenv("LAB_POOL_SIZE", "10G")
		h, daemons := workloadLab(b, "bl", productionFlags...)
		waitSettled(b, daemons, 3)
		if want("footprint") {
			measureFootprint(b, footprint, "3 hosts", daemons)
		}
		for _, s := range []struct {
			name string
			run  func() *table
		}{
			{"factstore", func() *table { guarded.facts = benchFactStore(b, daemons, max(runs, 5)); return guarded.facts }},
			{"throughput", func() *table { return benchThroughput(b, h, daemons, runs) }},
			{"downtime", func() *table {
				down, breakdown := benchDowntime(b, h, daemons, sizes, runs)
				report.Sections = append(report.Sections, down)
				return breakdown
			}},
			{"restart", func() *table { return benchRestart(b, h, daemons, max(runs, 5)) }},
			{"failover", func() *table { guarded.failover = benchFailover(b, h, daemons, max(runs, 5)); return guarded.failover }},
		} {
			if want(s.name) {
				report.Sections = append(report.Sections, s.run())
			}
		}
	})
	if want("trust") {
		// The same measurements on daemons whose Raft and RPC accept any
		// process that reaches the overlay address (the guard off), side
		// by side with the guarded ones above.
		b.Run("3-hosts-open", func(b *testing.B) {
			h, daemons := workloadLab(b, "bo", append(productionFlags, "--open-overlay-ports")...)
			waitSettled(b, daemons, 3)
			open.facts = benchFactStore(b, daemons, max(runs, 5))
			open.failover = benchFailover(b, h, daemons, max(runs, 5))
		})
		if guarded.facts != nil && guarded.failover != nil {
			report.Sections = append(report.Sections, costOfTrust(guarded, open))
		}
	}
	if want("footprint") {
		b.Run("10-hosts", func(b *testing.B) {
			_, daemons := workloadLabN(b, "bx", 10, productionFlags...)
			waitSettled(b, daemons, 0)
			measureFootprint(b, footprint, "10 hosts", daemons)
		})
		report.Sections = append(report.Sections, footprint)
	}
	if b.Failed() {
		return // a partial table would read as a complete one
	}
	report.Took = time.Since(report.Started).Round(time.Second).String()
	if err := report.write(out); err != nil {
		b.Fatal(err)
	}
	b.Logf("results in %s", out)
}

// productionFlags undo the lab daemons' test settings (flags given later
// win): production timing, info logging.
var productionFlags = []string{"--lab-timing=false", "--log-level=info"}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func envInt(b testing.TB, key string, def int) int {
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a positive number", key, v)
	}
	return n
}

func client(d *labDaemon) *ctlapi.Client { return &ctlapi.Client{SocketPath: d.socket()} }

// waitSettled waits until every daemon sees one leader, every machine
// alive, and (when voters > 0) that many voters.
func waitSettled(b testing.TB, daemons []*labDaemon, voters int) {
	b.Helper()
	testpoll.Until(b, 2*time.Minute, "a settled cluster", func() error {
		for _, d := range daemons {
			if d.proc.Exited() {
				continue
			}
			st, err := d.status()
			if err != nil {
				return err
			}
			if st.LeaderName == "" || (voters > 0 && len(st.Voters) != voters) {
				return fmt.Errorf("%s: leader %q, %d voters", d.host.Name, st.LeaderName, len(st.Voters))
			}
			ms, err := d.machines()
			if err != nil {
				return err
			}
			for _, m := range ms {
				if m.Liveness != "alive" {
					return fmt.Errorf("%s sees %s %s", d.host.Name, m.Name, m.Liveness)
				}
			}
		}
		return nil
	})
}

// leaderOf is the daemon the cluster has as its leader.
func leaderOf(b testing.TB, daemons []*labDaemon) *labDaemon {
	b.Helper()
	st, err := daemons[0].status()
	if err != nil {
		b.Fatal(err)
	}
	for _, d := range daemons {
		if d.host.Name == st.LeaderName {
			return d
		}
	}
	b.Fatalf("leader %q is none of the lab's daemons", st.LeaderName)
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// benchFactStore: commit latency and rate of the fact store over the
// mesh, proposed on the leader and on a follower (forwarded).
func benchFactStore(b *testing.B, daemons []*labDaemon, runs int) *table {
	t := &table{
		Title: "Fact store",
		How: fmt.Sprintf("`droverctl cluster probe`: no-op entries committed through Raft by 3 voters over the WireGuard mesh (proposal, forwarding from a follower, replication, apply); "+
			"latency of one entry and entries per second of the run. %d runs of 200 entries (1 proposer) and 4000 entries (32 proposers).", runs),
		Header: []string{"proposed on", "proposers", "p50 (ms)", "p99 (ms)", "entries/s"},
	}
	leader := leaderOf(b, daemons)
	follower := daemons[0]
	if follower == leader {
		follower = daemons[1]
	}
	for _, on := range []struct {
		name string
		d    *labDaemon
	}{{"leader", leader}, {"follower", follower}} {
		for _, proposers := range []int{1, 32} {
			count := 200
			if proposers > 1 {
				count = 4000
			}
			var p50, p99, rate []float64
			for range runs {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
				r, err := client(on.d).Probe(ctx, ctlapi.ProbeRequest{Proposers: proposers, Count: count})
				cancel()
				if err != nil || r.Failed > 0 {
					b.Fatalf("probe on %s with %d proposers: %v %+v", on.d.host.Name, proposers, err, r)
				}
				p50 = append(p50, ms(time.Duration(r.P50)))
				p99 = append(p99, ms(time.Duration(r.P99)))
				rate = append(rate, r.PerSecond)
			}
			key := fmt.Sprintf("%s/proposers=%d/", on.name, proposers)
			t.add(on.name, strconv.Itoa(proposers),
				t.figure(key+"p50_ms", p50).cell("%.2f"), t.figure(key+"p99_ms", p99).cell("%.2f"), t.figure(key+"entries_per_s", rate).cell("%.0f"))
		}
	}
	return t
}

// benchManifest is one service of namespace bench with a volume of
// quotaMiB, writing writeRate bytes/s in the background.
func benchManifest(service, volume, machine string, quotaMiB, writeRate int) string {
	return fmt.Sprintf(`namespace = "bench"

[services.%[1]s]
image = "drover-test:latest"
env = { PORT = "8080", WRITE_RATE_BYTES = "%[5]d" }
machine = "%[3]s"

[[services.%[1]s.ports]]
port = 80
target = 8080

[[services.%[1]s.volumes]]
name = "%[2]s"
path = "/data"
quota = "%[4]dMiB"

[services.%[1]s.readiness]
http = "/healthz"
interval = "100ms"
`, service, volume, machine, quotaMiB, writeRate)
}

// deployBench deploys one service of namespace bench (replacing the one
// before; volumes stay) and fills its volume with dataMiB of random data.
func deployBench(b *testing.B, d *labDaemon, on *lab.Host, service, volume string, dataMiB, writeRate int) string {
	b.Helper()
	mf := writeManifest(b, service+".toml", benchManifest(service, volume, on.Name, dataMiB+512, writeRate))
	testpoll.Until(b, time.Minute, "deploy of bench/"+service, func() error {
		if out, err := d.ctl("deploy", "-f", mf); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	fillRandom(b, filepath.Join(on.PoolMount, "drover", "bench", volume), dataMiB)
	for _, s := range services(b, d) {
		if s.Name == service {
			return s.ServiceIP
		}
	}
	b.Fatalf("bench/%s not in service ls", service)
	return ""
}

// migrateOnce moves bench/service to host to, executed by executor.
func migrateOnce(b *testing.B, executor *labDaemon, service string, to *lab.Host) (ctlapi.MigrationInfo, []ctlapi.MigrationEvent) {
	b.Helper()
	info, events, out, err := migrateJSON(executor, "migrate", "apply", "bench/"+service, "--to", to.Name)
	if err != nil || info.Phase != "done" || len(info.Volumes) == 0 {
		b.Fatalf("migrating bench/%s to %s: %v\n%s", service, to.Name, err, out)
	}
	return info, events
}

// phaseTimes says when each phase of a migration began, from start.
func phaseTimes(start time.Time, events []ctlapi.MigrationEvent) string {
	var parts []string
	for _, e := range events {
		if e.Kind == "phase" {
			parts = append(parts, fmt.Sprintf("%s +%.2fs", e.Phase, e.Time.Sub(start).Seconds()))
		}
	}
	return strings.Join(parts, ", ")
}

// purgeSource destroys a moved service's kept copy on its old host, so
// the next move back is a full one again.
func purgeSource(b *testing.B, d *labDaemon, id string) {
	b.Helper()
	if out, err := d.ctl("migrate", "purge-source", id); err != nil {
		b.Fatalf("purge-source %s: %v\n%s", id, err, out)
	}
}

// benchThroughput: a full volume send between two hosts through drover
// (the first warm round of a migration: zfs send on the source, streamed
// over the mesh, zfs receive on the target) against zfs send | zfs
// receive of the same data inside one host.
func benchThroughput(b *testing.B, h []*lab.Host, daemons []*labDaemon, runs int) *table {
	const dataMiB = 512
	t := &table{
		Title: "Transfer throughput",
		How: fmt.Sprintf("A full send of a quiet %d MiB volume of random data. drover: the first warm round of `migrate apply` between two hosts (zfs send on the source, "+
			"streamed over the WireGuard mesh, zfs receive on the target), bytes over the round's time. Local limit: `zfs send | zfs receive` of the same snapshot inside the source host. %d runs, alternating direction.", dataMiB, runs),
		Header: []string{"path", "MiB/s"},
	}
	d := daemons[2]
	deployBench(b, d, h[0], "bulk", "bulk", dataMiB, 0)
	var viaDrover, local []float64
	for r := range runs {
		from, to := h[r%2], h[(r+1)%2]
		info, events := migrateOnce(b, d, "bulk", to)
		var rate float64
		for _, e := range events {
			if e.Kind == "progress" && e.Round == 1 && e.Volume == "bulk" {
				rate = e.Rate // the last one covers the whole round
			}
		}
		if rate == 0 {
			b.Fatalf("migration %s reported no progress of its first round", info.ID)
		}
		viaDrover = append(viaDrover, rate/(1<<20))
		snap := from.Pool + "/drover/bench/bulk@" + info.Volumes[0].Snapshot
		local = append(local, localSendRate(b, snap, from.Pool+"/scratch"))
		purgeSource(b, d, info.ID)
	}
	fd, fl := t.figure("drover_mib_per_s", viaDrover), t.figure("local_mib_per_s", local)
	t.add("drover, between two hosts over the mesh", fd.cell("%.1f"))
	t.add("`zfs send \\| zfs receive` inside one host", fl.cell("%.1f"))
	t.add("**drover / local**", fmt.Sprintf("**%.2f**", t.ratio("drover_over_local", ratio(fd, fl))))
	return t
}

// localSendRate sends snap into dataset on the same pool and returns MiB/s.
func localSendRate(b *testing.B, snap, dataset string) float64 {
	b.Helper()
	send := exec.Command("zfs", "send", snap)
	recv := exec.Command("zfs", "receive", dataset)
	stream, err := send.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	pr, pw := io.Pipe()
	recv.Stdin = pr
	var recvOut strings.Builder
	recv.Stdout, recv.Stderr = &recvOut, &recvOut
	start := time.Now()
	if err := recv.Start(); err != nil {
		b.Fatal(err)
	}
	if err := send.Start(); err != nil {
		b.Fatal(err)
	}
	n, copyErr := io.Copy(pw, stream)
	pw.Close()
	sendErr, recvErr := send.Wait(), recv.Wait()
	took := time.Since(start)
	if copyErr != nil || sendErr != nil || recvErr != nil {
		b.Fatalf("local zfs send %s | zfs receive %s: %v %v %v %s", snap, dataset, copyErr, sendErr, recvErr, recvOut.String())
	}
	if err := zfsDestroy(dataset); err != nil {
		b.Fatal(err)
	}
	return float64(n) / (1 << 20) / took.Seconds()
}

// benchDowntime: the longest gap clients probing every 10 ms see while a
// service writing 1 MiB/s, then 10 MiB/s, moves, drover's warm migration
// against cold stop-copy-start, per volume size; with drover's own
// breakdown of each move's downtime.
func benchDowntime(b *testing.B, h []*lab.Host, daemons []*labDaemon, sizes []int, runs int) (*table, *table) {
	rates := []int{1 << 20, 10 << 20}
	t := &table{
		Title: "Migration downtime",
		How: fmt.Sprintf("Clients ask the service for /healthz every 10 ms (new connection, %v timeout), one on a third host and one on the move's target host; downtime is the longest gap between two answers. "+
			"The service writes 1 MiB/s or 10 MiB/s to its volume throughout. drover: `droverctl migrate apply` (warm copy while it runs, the target prepared after the first round with its container started held, then stop and final increments in one call, release on the target, commit; readiness checked at 10 ms, then doubling up to 100 ms; the clients use the service IP). "+
			"Cold stop-copy-start, the baseline (at 1 MiB/s): `docker stop`, a full `zfs send | zfs receive` between the hosts over plain TCP on the lab network (no encryption, so faster per byte than the mesh), `docker run` on the target; the client on the third host asks both hosts. "+
			"drover stop→commit is drover's own figure (from the stop to the commit applied); the final increment is what was sent after the stop. %d runs per row, alternating direction.", probeTimeout, runs),
		Header: []string{"volume", "writes", "drover, client on a third host (s)", "drover, client on the target host (s)", "cold (s)", "cold / drover", "drover stop→commit (s)", "final increment (MiB)", "drover whole move (s)", "cold copy (s)"},
	}
	breakdown := &table{
		Title: "Where a move's downtime goes",
		How: "drover's breakdown of each move above (`migrate show`, `--json` cutover), median of the runs, in ms: stop, until the source container's processes are gone; the final snapshots taken (side by side); the final increments sent and received where the volumes are mounted; the target's container, started before the stop under drover-hold, released into the service's command (or, without drover-hold, started); its readiness check passed; the commit proposed and applied. " +
			"The copies were put in place and the container started held after the first warm round (prepared), not in the downtime. What the clients see beyond stop→commit is the route moving and their own probe interval.",
		Header: []string{"volume", "writes", "stop", "final snapshot", "final send", "release (or start)", "ready", "commit", "stop→commit", "prepared before the stop"},
	}
	d := daemons[2]
	for _, size := range sizes {
		var coldDown, coldCopy []float64
		for _, rate := range rates {
			svc, vol := fmt.Sprintf("s%dw%d", size, rate>>20), fmt.Sprintf("d%dw%d", size, rate>>20)
			ip := deployBench(b, d, h[0], svc, vol, size, rate)
			var third, target, total, final, whole []float64
			parts := map[string][]float64{}
			for r := range runs {
				to := h[(r+1)%2]
				onThird := startProber(b, h[2], 10*time.Millisecond, ip+":80")
				onTarget := startProber(b, to, 10*time.Millisecond, ip+":80")
				time.Sleep(time.Second)
				began := time.Now()
				info, events := migrateOnce(b, d, svc, to)
				took := time.Since(began)
				if info.Cutover == nil {
					b.Fatalf("migration %s recorded no breakdown", info.ID)
				}
				c := info.Cutover
				b.Logf("bench/%s to %s: %s; %s", svc, to.Name, c, phaseTimes(began, events))
				time.Sleep(1500 * time.Millisecond)
				for name, p := range map[string]*prober{"third host": onThird, "target host": onTarget} {
					if err := p.Stop(); err != nil {
						b.Fatal(err)
					}
					gap, err := p.longestGap()
					if err != nil {
						b.Fatalf("drover move of %s, client on the %s: %v", svc, name, err)
					}
					if name == "third host" {
						third = append(third, gap.Seconds())
					} else {
						target = append(target, gap.Seconds())
					}
				}
				whole = append(whole, took.Seconds())
				total = append(total, time.Duration(c.Total).Seconds())
				final = append(final, float64(c.FinalBytes)/(1<<20))
				for name, v := range map[string]ctlapi.Duration{"stop": c.Stop, "final_snapshot": c.FinalSnapshot, "final_send": c.FinalSend,
					"start": c.Start, "ready": c.Ready, "commit": c.Commit, "total": c.Total, "prepared": c.Prepared} {
					parts[name] = append(parts[name], float64(time.Duration(v).Microseconds())/1000)
				}
				purgeSource(b, d, info.ID)
			}
			if coldDown == nil {
				coldDown, coldCopy = coldMoves(b, h, size, rates[0], runs)
			}
			key := fmt.Sprintf("%dMiB/%dMiBps/", size, rate>>20)
			fd, fc := t.figure(key+"drover_third_host_s", third), t.figure(key+"cold_s", coldDown)
			t.add(fmt.Sprintf("%d MiB", size), fmt.Sprintf("%d MiB/s", rate>>20), fd.cell("%.2f"),
				t.figure(key+"drover_target_host_s", target).cell("%.2f"), fc.cell("%.2f"),
				fmt.Sprintf("**%.1f×**", t.ratio(key+"cold_over_drover", ratio(fc, fd))),
				t.figure(key+"drover_stop_to_commit_s", total).cell("%.2f"), t.figure(key+"final_increment_mib", final).cell("%.1f"),
				t.figure(key+"drover_whole_move_s", whole).cell("%.1f"), t.figure(key+"cold_copy_s", coldCopy).cell("%.1f"))
			row := []string{fmt.Sprintf("%d MiB", size), fmt.Sprintf("%d MiB/s", rate>>20)}
			for _, name := range []string{"stop", "final_snapshot", "final_send", "start", "ready", "commit", "total", "prepared"} {
				row = append(row, breakdown.figure(key+name+"_ms", parts[name]).cell("%.0f"))
			}
			breakdown.add(row...)
		}
	}
	return t, breakdown
}

// benchRestart: the longest gap a client on another host sees while the
// daemon of the host running a service restarts (SIGTERM, start again).
// The containers keep running; the mesh device, which the daemon
// carries, comes back with the peers it kept.
func benchRestart(b *testing.B, h []*lab.Host, daemons []*labDaemon, runs int) *table {
	t := &table{
		Title: "Daemon restart",
		How: fmt.Sprintf("A service on one host; a client on another host asks it for /healthz every 10 ms (new connection, %v timeout) at its service IP while `droverd` on the service's host is stopped with SIGTERM and started again. "+
			"The gap is the longest time between two answers; the restart is the time from SIGTERM to the daemon's control socket answering again. %d runs.", probeTimeout, runs),
		Header: []string{"what", "seconds"},
	}
	d := daemons[2]
	ip := deployBench(b, d, h[0], "steady", "steady", 16, 0)
	var gaps, restarts []float64
	for range runs {
		p := startProber(b, h[1], 10*time.Millisecond, ip+":80")
		time.Sleep(2 * time.Second)
		began := time.Now()
		if err := daemons[0].proc.Stop(30 * time.Second); err != nil {
			b.Fatalf("stopping droverd on %s: %v", h[0].Name, err)
		}
		daemons[0].start(b)
		restarts = append(restarts, time.Since(began).Seconds())
		waitSettled(b, daemons, 3)
		time.Sleep(2 * time.Second)
		if err := p.Stop(); err != nil {
			b.Fatal(err)
		}
		gap, err := p.longestGap()
		if err != nil {
			b.Fatalf("client during the restart: %v", err)
		}
		gaps = append(gaps, gap.Seconds())
	}
	t.add("longest gap for a client on another host", t.figure("client_gap_s", gaps).cell("%.2f"))
	t.add("restart (SIGTERM to control socket)", t.figure("restart_s", restarts).cell("%.2f"))
	return t
}

// coldMoves is the stop-copy-start baseline: the test image run directly
// by Docker on a plain dataset of host 1, moved between hosts 1 and 2
// runs times. It returns the downtime and the copy time of each run.
func coldMoves(b *testing.B, h []*lab.Host, size, writeRate, runs int) (downtime, copying []float64) {
	b.Helper()
	name := fmt.Sprintf("cold-s%d", size)
	dataset := func(x *lab.Host) string { return fmt.Sprintf("%s/cold/s%d", x.Pool, size) }
	mount := func(x *lab.Host) string { return filepath.Join(x.PoolMount, "cold", fmt.Sprintf("s%d", size)) }
	addr := func(x *lab.Host) string { return x.UnderlayIP + ":8090" }
	docker := func(x *lab.Host, args ...string) {
		b.Helper()
		if out, err := exec.Command("docker", append([]string{"-H", "unix://" + x.DockerSock}, args...)...).CombinedOutput(); err != nil {
			b.Fatalf("docker %s on %s: %v: %s", strings.Join(args, " "), x.Name, err, out)
		}
	}
	zfs := func(args ...string) {
		b.Helper()
		if out, err := exec.Command("zfs", args...).CombinedOutput(); err != nil {
			b.Fatalf("zfs %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run := func(x *lab.Host) {
		docker(x, "run", "-d", "--name", name, "-e", "PORT=8080", "-e", fmt.Sprintf("WRITE_RATE_BYTES=%d", writeRate),
			"-v", mount(x)+":/data", "-p", addr(x)+":8080", "drover-test:latest")
	}
	answers := func(x *lab.Host) error {
		return inNetns(h[2], func() error {
			if !httpAnswers(addr(x), "/healthz", time.Second) {
				return fmt.Errorf("%s does not answer at %s", name, addr(x))
			}
			return nil
		})
	}
	for _, x := range h[:2] {
		zfs("create", "-p", x.Pool+"/cold")
	}
	zfs("create", dataset(h[0]))
	fillRandom(b, mount(h[0]), size)
	run(h[0])
	testpoll.Until(b, 30*time.Second, name+" answering", func() error { return answers(h[0]) })

	for r := range runs {
		from, to := h[r%2], h[(r+1)%2]
		p := startProber(b, h[2], 10*time.Millisecond, addr(from), addr(to))
		time.Sleep(time.Second)
		docker(from, "stop", name)
		snap := fmt.Sprintf("%s@move%d", dataset(from), r)
		zfs("snapshot", snap)
		began := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		_, err := sendBetweenHosts(ctx, from, to, snap, dataset(to))
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		copying = append(copying, time.Since(began).Seconds())
		if out, _ := exec.Command("zfs", "get", "-H", "-o", "value", "mounted", dataset(to)).Output(); strings.TrimSpace(string(out)) != "yes" {
			zfs("mount", dataset(to))
		}
		docker(from, "rm", name)
		run(to)
		testpoll.Until(b, 30*time.Second, name+" answering on "+to.Name, func() error { return answers(to) })
		time.Sleep(1500 * time.Millisecond)
		if err := p.Stop(); err != nil {
			b.Fatal(err)
		}
		gap, err := p.longestGap()
		if err != nil {
			b.Fatalf("cold move of %s: %v", name, err)
		}
		downtime = append(downtime, gap.Seconds())
		if err := zfsDestroy(dataset(from)); err != nil {
			b.Fatal(err)
		}
	}
	docker(h[runs%2], "rm", "-f", name)
	if err := zfsDestroy(dataset(h[runs%2])); err != nil {
		b.Fatal(err)
	}
	return downtime, copying
}

// zfsDestroy destroys a dataset and its snapshots, riding out the moment
// zfs-fuse calls a dataset just received or just left by its writer busy.
func zfsDestroy(dataset string) error {
	for try := 0; ; try++ {
		out, err := exec.Command("zfs", "destroy", "-r", dataset).CombinedOutput()
		if err == nil {
			return nil
		}
		if try == 40 || !strings.Contains(string(out), "busy") {
			return fmt.Errorf("destroying %s: %w: %s", dataset, err, out)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// benchFailover: from killing the leader's daemon to the next committed
// entry; from cutting a follower's host off to `machine ls` showing it
// failed.
func benchFailover(b *testing.B, h []*lab.Host, daemons []*labDaemon, runs int) *table {
	t := &table{
		Title: "Failover",
		How: fmt.Sprintf("Leader: SIGKILL of the leader's droverd, then a survivor proposes one entry every attempt (`cluster probe --count 1 --timeout 250ms`) until one commits; the daemon is restarted and the cluster settles between runs. "+
			"Cut host: a follower's link is taken down (`ip link set ... down`), then another machine's `machine ls` is read every 20 ms until it shows the host failed; the link comes back between runs. %d runs each.", runs),
		Header: []string{"event", "time (s)"},
	}
	var elect, failed []float64
	for range runs {
		leader := leaderOf(b, daemons)
		survivor := daemons[0]
		if survivor == leader {
			survivor = daemons[1]
		}
		if err := leader.proc.Kill(); err != nil {
			b.Fatal(err)
		}
		killed := time.Now()
		elect = append(elect, pollFast(b, "an entry committed after the leader died", killed, 0, func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			r, err := client(survivor).Probe(ctx, ctlapi.ProbeRequest{Count: 1, Timeout: ctlapi.Duration(250 * time.Millisecond)})
			return err == nil && r.Committed == 1
		}))
		leader.start(b)
		waitSettled(b, daemons, 3)
	}
	for r := range runs {
		leader := leaderOf(b, daemons)
		var followers []*labDaemon
		for _, d := range daemons {
			if d != leader {
				followers = append(followers, d)
			}
		}
		cut, observer := followers[r%2], followers[(r+1)%2]
		if err := h[0].Lab().SetLinkUp(cut.host, false); err != nil {
			b.Fatal(err)
		}
		down := time.Now()
		failed = append(failed, pollFast(b, cut.host.Name+" shown failed", down, 20*time.Millisecond, func() bool {
			ms, err := client(observer).Machines(context.Background())
			return err == nil && slices.ContainsFunc(ms, func(m ctlapi.Machine) bool { return m.Name == cut.host.Name && m.Liveness == "failed" })
		}))
		if err := h[0].Lab().SetLinkUp(cut.host, true); err != nil {
			b.Fatal(err)
		}
		waitSettled(b, daemons, 3)
	}
	t.add("leader's daemon killed → next entry committed", t.figure("leader_killed_to_commit_s", elect).cell("%.2f"))
	t.add("host cut off → `machine ls` shows it failed", t.figure("cut_to_failed_s", failed).cell("%.2f"))
	return t
}

// pollFast tries cond every interval (back to back when 0) until it holds
// and returns the seconds since from; it fails b after a minute.
func pollFast(b testing.TB, what string, from time.Time, every time.Duration, cond func() bool) float64 {
	b.Helper()
	for !cond() {
		if time.Since(from) > time.Minute {
			b.Fatalf("%s: not after a minute", what)
		}
		time.Sleep(every)
	}
	return time.Since(from).Seconds()
}

// measureFootprint adds a row of droverd's idle RSS and CPU per host.
func measureFootprint(b *testing.B, t *table, labName string, daemons []*labDaemon) {
	b.Helper()
	const windows, window = 3, 10 * time.Second
	time.Sleep(5 * time.Second) // let joins, promotions and first reconciles pass
	cpu := make([][]float64, len(daemons))
	rss := make([][]float64, len(daemons))
	before := make([]float64, len(daemons))
	for i, d := range daemons {
		before[i] = cpuSeconds(b, d.proc.PID())
	}
	for range windows {
		time.Sleep(window)
		for i, d := range daemons {
			now := cpuSeconds(b, d.proc.PID())
			cpu[i] = append(cpu[i], 100*(now-before[i])/window.Seconds())
			before[i] = now
			rss[i] = append(rss[i], float64(rssKiB(d.proc.PID()))/1024)
		}
	}
	var hostCPU, hostRSS []float64
	for i := range daemons {
		hostCPU = append(hostCPU, newFigure(cpu[i]).Median)
		hostRSS = append(hostRSS, newFigure(rss[i]).Median)
	}
	key := strings.ReplaceAll(labName, " ", "_") + "/"
	t.add(labName, t.figure(key+"rss_mib", hostRSS).cell("%.1f"), t.figure(key+"cpu_percent", hostCPU).cell("%.2f"))
}

// cpuSeconds is a process's user and system CPU time, with that of the
// commands it ran and waited for (zfs, for one).
func cpuSeconds(b testing.TB, pid int) float64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: utime, stime, cutime, cstime are fields 14 to 17 of proc(5).
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	var ticks float64
	for _, field := range f[11:15] {
		v, _ := strconv.ParseFloat(field, 64)
		ticks += v
	}
	return ticks / 100 // USER_HZ is 100 on Linux
}

// trustRun holds the fact store and failover tables of one lab.
type trustRun struct{ facts, failover *table }

// costOfTrust compares the guarded daemons (Raft and RPC only for peers
// of the mesh) with open ones, measured in the same run.
func costOfTrust(guarded, open trustRun) *table {
	t := &table{
		Title: "The cost of trust",
		How: "The fact store and failover measurements above, run again on a second 3-host lab whose daemons have the guard off (`--open-overlay-ports`: Raft and RPC accept any process that reaches the overlay address, as before issue 14), in the same run. " +
			"Guarded: Raft and RPC bound to the WireGuard device, connections from the host itself refused, callers named by their overlay address, machines admitted by join grants.",
		Header: []string{"measure", "guarded", "open", "guarded / open"},
	}
	rows := []struct{ name, key, format string }{
		{"commit p50 on the leader, 1 proposer (ms)", "leader/proposers=1/p50_ms", "%.2f"},
		{"commit p50 on a follower, 1 proposer (ms)", "follower/proposers=1/p50_ms", "%.2f"},
		{"entries/s on the leader, 32 proposers", "leader/proposers=32/entries_per_s", "%.0f"},
		{"entries/s on a follower, 32 proposers", "follower/proposers=32/entries_per_s", "%.0f"},
		{"leader's daemon killed → next entry committed (s)", "leader_killed_to_commit_s", "%.2f"},
		{"host cut off → shown failed (s)", "cut_to_failed_s", "%.2f"},
	}
	for _, r := range rows {
		g, o := guarded.facts.Figures[r.key], open.facts.Figures[r.key]
		if len(g.Runs) == 0 {
			g, o = guarded.failover.Figures[r.key], open.failover.Figures[r.key]
		}
		t.add(r.name, g.cell(r.format), o.cell(r.format), fmt.Sprintf("**%.2f**", t.ratio(r.key, ratio(g, o))))
	}
	return t
}
