package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// pgRoot is the PostgreSQL root filesystem lab/postgres/build.sh keeps:
// the clients (psql, pgbench) run from it inside a lab host.
const pgRoot = "/var/lib/drover-lab/cache/postgres15-root"

// pgClient runs a PostgreSQL client of the image's root filesystem in h.
func pgClient(ctx context.Context, h *lab.Host, argv ...string) (string, error) {
	return h.Run(ctx, append([]string{"chroot", pgRoot, "/usr/bin/env", "PGCONNECT_TIMEOUT=2", "PGUSER=postgres", "PGDATABASE=postgres"}, argv...)...)
}

// psql runs one SQL command against the service at ip from h.
func psql(ctx context.Context, h *lab.Host, ip, sql string) (string, error) {
	return pgClient(ctx, h, "/usr/bin/psql", "-h", ip, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql)
}

const pgManifest = `namespace = "db"

[services.pg]
image = "drover-postgres:15"
machine = "%s"
env = { PGDATA = "/data/pg" }
stop_timeout = "30s"
# Before a move's last warm round: the checkpoint's writes travel while it
# runs, and the shutdown's own checkpoint has little left to write.
flush = ["/usr/lib/postgresql/15/bin/psql", "-h", "127.0.0.1", "-U", "postgres", "-X", "-q", "-c", "CHECKPOINT"]

[[services.pg.ports]]
port = 5432

[[services.pg.volumes]]
name = "data"
path = "/data"
quota = "2GiB"
recordsize = "8K"   # PostgreSQL's page: a page write is an 8 KiB change to send

[services.pg.readiness]
exec = ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-U", "postgres", "-q"]
interval = "300ms"
retries = 100
`

// inserter inserts increasing ids from one host, one transaction each,
// and keeps the ids whose COMMIT succeeded (psql exited 0).
type inserter struct {
	host  *lab.Host
	mu    sync.Mutex
	acked []int
	gaps  gapMeter
	stop  chan struct{}
	done  chan struct{}
}

func startInserter(h *lab.Host, ip string, firstID int) *inserter {
	w := &inserter{host: h, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for id := firstID; ; id++ {
			select {
			case <-w.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := psql(ctx, h, ip, fmt.Sprintf("INSERT INTO acked (host, id) VALUES ('%s', %d)", h.Name, id))
			cancel()
			if err == nil {
				w.mu.Lock()
				w.acked = append(w.acked, id)
				w.gaps.answer(time.Now())
				w.mu.Unlock()
			}
		}
	}()
	return w
}

// Stop ends the inserter and returns the acknowledged ids.
func (w *inserter) Stop() []int {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]int(nil), w.acked...)
}

// gapMeter keeps the longest time between two answers.
type gapMeter struct {
	last    time.Time
	longest time.Duration
	from    time.Time // when the longest gap began
}

func (g *gapMeter) answer(at time.Time) {
	if !g.last.IsZero() && at.Sub(g.last) > g.longest {
		g.longest, g.from = at.Sub(g.last), g.last
	}
	g.last = at
}

// pgbenchRun is one second of pgbench against the service.
type pgbenchRun struct {
	start, end time.Time
	tps        float64
	ok         bool
}

var tpsRE = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

// pgbenchLoop runs pgbench (4 clients, TPC-B-like) one second at a time
// from h until stop is closed: pgbench ends a client whose connection
// breaks, so each second is a run of its own, and a run that fails is
// time the service did not serve.
func pgbenchLoop(h *lab.Host, ip string, stop <-chan struct{}) <-chan []pgbenchRun {
	out := make(chan []pgbenchRun, 1)
	go func() {
		var runs []pgbenchRun
		defer func() { out <- runs }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			r := pgbenchRun{start: time.Now()}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			text, err := pgClient(ctx, h, "/usr/lib/postgresql/15/bin/pgbench", "-h", ip, "-n", "-c", "4", "-j", "2", "-T", "1")
			cancel()
			r.end = time.Now()
			if m := tpsRE.FindStringSubmatch(text); err == nil && m != nil {
				r.tps, _ = strconv.ParseFloat(m[1], 64)
				r.ok = true
			} else {
				time.Sleep(100 * time.Millisecond)
			}
			runs = append(runs, r)
		}
	}()
	return out
}

// pgbenchFigures sums runs up around a move from moveStart to moveEnd:
// median TPS before, during and after, and the longest time between two
// successful runs.
func pgbenchFigures(runs []pgbenchRun, moveStart, moveEnd time.Time) (before, during, after float64, gap time.Duration) {
	median := func(xs []float64) float64 {
		if len(xs) == 0 {
			return 0
		}
		sort.Float64s(xs)
		return xs[len(xs)/2]
	}
	var b, d, a []float64
	var lastOK time.Time
	for _, r := range runs {
		switch {
		case r.end.Before(moveStart):
			b = append(b, r.tps)
		case r.start.After(moveEnd):
			a = append(a, r.tps)
		default:
			d = append(d, r.tps)
		}
		if r.ok {
			if !lastOK.IsZero() && r.start.Sub(lastOK) > gap {
				gap = r.start.Sub(lastOK)
			}
			lastOK = r.end
		}
	}
	return median(b), median(d), median(a), gap
}

// pgLog is the PostgreSQL server log kept on the service's volume.
func pgLog(t *testing.T, owner *lab.Host) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(owner.PoolMount, "drover", "db", "data", "pg", "log", "postgresql.log"))
	if err != nil {
		t.Fatalf("the PostgreSQL log on %s: %v", owner.Name, err)
	}
	return string(b)
}

// requireCleanHandover checks the server log after the n-th move: n
// clean shutdowns (fast, on its stop signal), every start after one a
// start from a cleanly shut down cluster, and no crash recovery.
func requireCleanHandover(t *testing.T, log string, n int) {
	t.Helper()
	if got := strings.Count(log, "database system is shut down"); got < n {
		t.Fatalf("%d clean shutdowns in the server log, want %d:\n%s", got, n, log)
	}
	if got := strings.Count(log, "received fast shutdown request"); got < n {
		t.Fatalf("%d fast shutdowns (SIGINT) in the server log, want %d:\n%s", got, n, log)
	}
	for _, bad := range []string{"was interrupted", "redo starts at", "not properly shut down", "automatic recovery in progress"} {
		if strings.Contains(log, bad) {
			t.Fatalf("the server log shows crash recovery (%q):\n%s", bad, log)
		}
	}
	if got := strings.Count(log, "database system was shut down at"); got < n {
		t.Fatalf("%d starts from a clean shutdown, want %d:\n%s", got, n, log)
	}
}

// requireAckedRows checks that every acknowledged insert is a row.
func requireAckedRows(t *testing.T, from *lab.Host, ip string, acked map[string][]int) {
	t.Helper()
	out, err := psql(context.Background(), from, ip, "SELECT host || ':' || id FROM acked")
	if err != nil {
		t.Fatalf("reading the rows: %v", err)
	}
	rows := map[string]bool{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		rows[l] = true
	}
	total := 0
	for host, ids := range acked {
		for _, id := range ids {
			if !rows[fmt.Sprintf("%s:%d", host, id)] {
				t.Fatalf("insert %d from %s was acknowledged (COMMIT succeeded) but is not in the table", id, host)
			}
		}
		total += len(ids)
		if len(ids) == 0 {
			t.Fatalf("the client on %s had no insert acknowledged", host)
		}
	}
	t.Logf("all %d acknowledged inserts are rows (%d rows)", total, len(rows))
}

// TestLabPostgres: a real database moved under load. PostgreSQL 15 from
// Debian's packages, deployed with a ZFS volume, under pgbench from a
// third host and inserting clients on every host, is moved by `migrate
// apply` and then by a drain of its machine. After each, every insert
// whose COMMIT succeeded is in the table, and the server's log (kept on
// the volume) shows a fast, clean shutdown and a start without crash
// recovery. pgbench's TPS before, during and after, and the longest gap,
// are logged (and written to DROVER_BENCH_OUT/postgres.md when set).
func TestLabPostgres(t *testing.T) {
	requireLab(t)
	h, daemons := workloadLab(t, "dp")
	d1 := daemons[0]
	var socks []string
	for _, host := range h {
		socks = append(socks, host.DockerSock)
	}
	began := time.Now()
	if out, err := exec.Command(filepath.Join(filepath.Dir(lab.Script()), "postgres", "build.sh"), socks...).CombinedOutput(); err != nil {
		t.Fatalf("postgres image: %v\n%s", err, out)
	}
	t.Logf("drover-postgres:15 on 3 engines in %v", time.Since(began).Round(time.Second))

	mf := writeManifest(t, "db.toml", fmt.Sprintf(pgManifest, h[1].Name))
	if out, err := d1.ctlWithin(3*time.Minute, "deploy", "-f", mf); err != nil {
		t.Fatalf("deploy: %v\n%s", err, out)
	}
	ip := services(t, d1)[0].ServiceIP
	ctx := context.Background()
	if _, err := psql(ctx, h[0], ip, "CREATE TABLE acked (host text, id int, PRIMARY KEY (host, id))"); err != nil {
		t.Fatal(err)
	}
	if out, err := pgClient(ctx, h[0], "/usr/lib/postgresql/15/bin/pgbench", "-h", ip, "-i", "-s", "10", "-q"); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}

	var report strings.Builder
	fmt.Fprintf(&report, "| move | volume | drover's downtime (s) | TPS before | TPS during | TPS after | longest pgbench gap (s) | longest insert gap (s) | final increment (MiB) | stop / final snapshot / final send / start / ready / commit (ms) |\n|---|---|---|---|---|---|---|---|---|---|\n")
	acked := map[string][]int{}
	move := func(what string, n int, run func() (string, ctlapi.MigrationInfo)) *lab.Host {
		var ins []*inserter
		for _, host := range h {
			// Ids of their own per move: an id is inserted once.
			ins = append(ins, startInserter(host, ip, n*1_000_000))
		}
		stop := make(chan struct{})
		bench := pgbenchLoop(h[0], ip, stop)
		time.Sleep(8 * time.Second)
		moveStart := time.Now()
		ownerName, info := run()
		downtime := time.Duration(info.Downtime)
		c := info.Cutover
		if c == nil {
			t.Fatalf("%s: migration %s recorded no breakdown", what, info.ID)
		}
		t.Logf("%s: %s", what, c)
		moveEnd := time.Now()
		t.Logf("%s ran from %s to %s", what, moveStart.Format("15:04:05.0"), moveEnd.Format("15:04:05.0"))
		time.Sleep(8 * time.Second)
		close(stop)
		runs := <-bench
		var insertGap time.Duration
		for i, w := range ins {
			acked[h[i].Name] = append(acked[h[i].Name], w.Stop()...)
			insertGap = max(insertGap, w.gaps.longest)
			t.Logf("%s: inserts from %s: longest gap %v from %s", what, h[i].Name, w.gaps.longest.Round(100*time.Millisecond), w.gaps.from.Format("15:04:05.0"))
		}
		var owner *lab.Host
		for _, host := range h {
			if host.Name == ownerName {
				owner = host
			}
		}
		requireAckedRows(t, h[0], ip, acked)
		requireCleanHandover(t, pgLog(t, owner), n)
		before, during, after, gap := pgbenchFigures(runs, moveStart, moveEnd)
		var vol ctlapi.Volume
		for i, host := range h {
			if host == owner {
				vol = volumes(t, daemons[i])[0] // the owner knows its size
			}
		}
		msOf := func(d ctlapi.Duration) int64 { return time.Duration(d).Milliseconds() }
		fmt.Fprintf(&report, "| %s | %d MiB | %.2f | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f | %d / %d / %d / %d / %d / %d |\n", what, vol.UsedBytes>>20, downtime.Seconds(), before, during, after, gap.Seconds(), insertGap.Seconds(),
			float64(c.FinalBytes)/(1<<20), msOf(c.Stop), msOf(c.FinalSnapshot), msOf(c.FinalSend), msOf(c.Start), msOf(c.Ready), msOf(c.Commit))
		t.Logf("%s to %s: downtime %v; pgbench TPS before %.0f, during %.0f, after %.0f; longest pgbench gap %v, longest insert gap %v",
			what, ownerName, downtime, before, during, after, gap.Round(100*time.Millisecond), insertGap.Round(100*time.Millisecond))
		return owner
	}

	// migrate apply, from host 2 to host 3.
	move("migrate apply", 1, func() (string, ctlapi.MigrationInfo) {
		info, _, out, err := migrateJSON(d1, "migrate", "apply", "db/pg", "--to", h[2].Name)
		if err != nil || info.Phase != "done" {
			t.Fatalf("migrate: %v %+v\n%s", err, info, out)
		}
		return h[2].Name, info
	})

	// A drain of host 3 moves it on.
	drained := move("drain", 2, func() (string, ctlapi.MigrationInfo) {
		if out, err := d1.ctlWithin(5*time.Minute, "machine", "drain", h[2].Name, "--wait"); err != nil {
			t.Fatalf("drain: %v\n%s", err, out)
		}
		ss := services(t, d1)
		var last ctlapi.MigrationInfo
		for _, m := range migrationsOf(t, d1) {
			if m.StartedAt.After(last.StartedAt) {
				last = m
			}
		}
		t.Logf("drain's move %s: source stopped %s, target ready %s", last.ID, last.SourceStopped.Format("15:04:05.000"), last.TargetReady.Format("15:04:05.000"))
		return ss[0].Machine, last
	})

	// The baseline: the same database moved cold (stop, full copy, start).
	var to *lab.Host
	for _, x := range h {
		if x != drained && to == nil {
			to = x
		}
	}
	gap, took, mib := coldPostgresMove(t, h, drained, to)
	fmt.Fprintf(&report, "\nCold stop-copy-start of the same database, the baseline: a copy of its volume run by Docker directly on %s, "+
		"`docker stop` (a fast, clean shutdown), a full `zfs send | zfs receive` of %d MiB to %s over plain TCP, `docker run` there; "+
		"a client on the third host inserting every 100 ms, at either address: **longest insert gap %.1f s** (the copy alone %.1f s), "+
		"against drover's longest insert gaps above.\n", drained.Name, mib, to.Name, gap.Seconds(), took.Seconds())
	t.Logf("PostgreSQL under pgbench:\n%s", report.String())
	if dir := os.Getenv("DROVER_BENCH_OUT"); dir != "" {
		text := "# PostgreSQL moved under load\n\n" +
			"`TestLabPostgres` (make e2e; with DROVER_BENCH_OUT it writes this file): PostgreSQL 15 from Debian's packages with a ZFS volume on a lab of 3 hosts, " +
			"pgbench -i -s 10, then pgbench (4 clients, TPC-B-like) from a third host one second at a time, and a client on every host inserting ids, one transaction each, every 100 ms. " +
			"TPS is the median of the one-second runs before, during and after the move; a gap is the longest time between two successful runs (pgbench) or two acknowledged inserts. " +
			"Every acknowledged insert was in the table afterwards, and the server log showed a fast, clean shutdown on the source and a start without crash recovery on the target.\n\n" +
			report.String()
		if err := writeAtomic(filepath.Join(dir, "postgres.md"), []byte(text)); err != nil {
			t.Fatal(err)
		}
	}
}

// coldPostgresMove is the stop-copy-start baseline for PostgreSQL: a copy
// of the drover volume on from, run by Docker directly there (port 5433 on
// the host's underlay address), moved to to by `docker stop`, a full
// `zfs send | zfs receive` over plain TCP and `docker run`, while a
// client on the third host inserts every 100 ms at either address. It
// returns the client's longest gap, the copy's time and the volume's MiB.
func coldPostgresMove(t *testing.T, h []*lab.Host, from, to *lab.Host) (gap, took time.Duration, mib int64) {
	t.Helper()
	var third *lab.Host
	for _, x := range h {
		if x != from && x != to {
			third = x
		}
	}
	ds := func(x *lab.Host) string { return x.Pool + "/coldpg" }
	mount := func(x *lab.Host) string { return filepath.Join(x.PoolMount, "coldpg") }
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
		}
	}
	docker := func(x *lab.Host, args ...string) {
		run("docker", append([]string{"-H", "unix://" + x.DockerSock}, args...)...)
	}
	start := func(x *lab.Host) {
		docker(x, "run", "-d", "--name", "coldpg", "--stop-signal", "SIGINT", "-e", "PGDATA=/data/pg",
			"-v", mount(x)+":/data", "-p", x.UnderlayIP+":5433:5432", "drover-postgres:15")
	}
	// A copy of the live volume: PostgreSQL recovers it at its first start.
	run("zfs", "snapshot", from.Pool+"/drover/db/data@coldpg")
	send := exec.Command("sh", "-c", fmt.Sprintf("zfs send %s/drover/db/data@coldpg | zfs receive %s", from.Pool, ds(from)))
	if out, err := send.CombinedOutput(); err != nil {
		t.Fatalf("copying the volume on %s: %v: %s", from.Name, err, out)
	}
	start(from)
	ctx := context.Background()
	insert := func(x *lab.Host, id int) bool {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := pgClient(cctx, third, "/usr/bin/psql", "-h", x.UnderlayIP, "-p", "5433", "-X", "-q", "-v", "ON_ERROR_STOP=1",
			"-c", fmt.Sprintf("INSERT INTO acked (host, id) VALUES ('cold', %d)", id))
		return err == nil
	}
	testpoll.Until(t, 2*time.Minute, "the cold copy answering on "+from.Name, func() error {
		if !insert(from, 0) {
			return fmt.Errorf("no insert at %s:5433", from.UnderlayIP)
		}
		return nil
	})
	var mu sync.Mutex
	var meter gapMeter
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		at := []*lab.Host{from, to}
		for id, i := 1, 0; ; id++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			for k := range at {
				if x := at[(i+k)%2]; insert(x, id) {
					mu.Lock()
					meter.answer(time.Now())
					mu.Unlock()
					i = (i + k) % 2
					break
				}
			}
		}
	}()
	time.Sleep(3 * time.Second)
	docker(from, "stop", "coldpg")
	run("zfs", "snapshot", ds(from)+"@move")
	began := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	n, err := sendBetweenHosts(cctx, from, to, ds(from)+"@move", ds(to))
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	took = time.Since(began)
	if out, _ := exec.Command("zfs", "get", "-H", "-o", "value", "mounted", ds(to)).Output(); strings.TrimSpace(string(out)) != "yes" {
		run("zfs", "mount", ds(to))
	}
	docker(from, "rm", "coldpg")
	start(to)
	testpoll.Until(t, 2*time.Minute, "the cold copy answering on "+to.Name, func() error {
		mu.Lock()
		defer mu.Unlock()
		if meter.last.Before(began) {
			return fmt.Errorf("no insert since the stop")
		}
		return nil
	})
	time.Sleep(2 * time.Second)
	close(stop)
	<-done
	docker(to, "rm", "-f", "coldpg")
	for _, d := range []string{ds(from), ds(to), from.Pool + "/drover/db/data@coldpg"} {
		if err := zfsDestroy(d); err != nil {
			t.Fatal(err)
		}
	}
	return meter.longest, took, n >> 20
}
