package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/internal/testpoll"
	"github.com/drover-sh/drover/lab"
)

// BenchmarkStandby measures standby replicas on a 3-host lab with
// production timing (`make bench`, bench/results/standby.md): what
// refreshing a copy costs its owner at 10 s and 30 s intervals, side by
// side with the same service without a standby, and the time from the
// owner's death to the service answering again on its standby.
func BenchmarkStandby(b *testing.B) {
	if os.Getenv("DROVER_BENCH") == "" {
		b.Skip("the lab benchmarks run with DROVER_BENCH=1 (make bench)")
	}
	requireLab(b)
	runs := envInt(b, "DROVER_BENCH_RUNS", 3)
	report := &benchReport{Name: "standby", Heading: "drover standby replicas on the lab", Started: time.Now(), Machine: machineFacts(binaries(b))}
	report.Machine["timing"] = "production defaults (Raft heartbeat 1s, memberlist LAN profile)"
	h, daemons := workloadLab(b, "bs", productionFlags...)
	waitSettled(b, daemons, 3)
	d3 := daemons[2]
	deploy := func(standby string) {
		mf := writeManifest(b, "bench.toml", benchManifest("sb", "sbdata", h[0].Name, 256, 1<<20)+standby)
		testpoll.Until(b, 2*time.Minute, "deploy", func() error {
			if out, err := d3.ctlWithin(90*time.Second, "deploy", "-f", mf); err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	}

	cost := &table{
		Title: "Standby: what the owner pays",
		How: "A service writing 1 MiB/s of random data (64 KiB files, rewritten in a ring) to a 256 MiB ZFS volume on host 1, without a standby, then with a standby on host 2 refreshed every 10 s and every 30 s. " +
			"Over 3 windows of 20 s each: CPU of the owner's `droverd` (with the `zfs` commands it runs; % of one core), CPU of the machine's one zfs-fuse daemon (which does the sends of every lab pool; % of one core), and the bytes the owner sent to the standby (`drover_standby_sent_bytes_total`) over the whole minute, per minute.",
		Header: []string{"standby", "owner droverd CPU (%)", "zfs-fuse CPU (%)", "sent (MiB/min)", "droverd CPU vs none"},
	}
	zfsPID := 0
	if out, err := exec.Command("pidof", "zfs-fuse").Output(); err == nil {
		zfsPID, _ = strconv.Atoi(strings.Fields(string(out))[0])
	}
	var base float64
	for _, c := range []struct{ name, standby string }{
		{"none", ""},
		{"every 10 s", "\n[services.sb.standby]\nmachine = \"" + h[1].Name + "\"\ninterval = \"10s\"\n"},
		{"every 30 s", "\n[services.sb.standby]\nmachine = \"" + h[1].Name + "\"\ninterval = \"30s\"\n"},
	} {
		deploy(c.standby)
		if c.standby != "" {
			testpoll.Until(b, 2*time.Minute, "a first standby copy", func() error {
				if sb := serviceNamed(b, d3, "bench", "sb").Standby; sb == nil || sb.Snapshot == "" {
					return fmt.Errorf("standby %+v", sb)
				}
				return nil
			})
		}
		time.Sleep(5 * time.Second)
		var cpu, zfs []float64
		sentBefore, measured := sentBytes(b, h[0]), time.Now()
		for range 3 {
			c0, z0 := cpuSeconds(b, daemons[0].proc.PID()), 0.0
			if zfsPID > 0 {
				z0 = cpuSeconds(b, zfsPID)
			}
			const window = 20 * time.Second
			time.Sleep(window)
			cpu = append(cpu, 100*(cpuSeconds(b, daemons[0].proc.PID())-c0)/window.Seconds())
			if zfsPID > 0 {
				zfs = append(zfs, 100*(cpuSeconds(b, zfsPID)-z0)/window.Seconds())
			}
		}
		// Over the whole minute: a 30 s refresh falls in some windows only.
		perMinute := (sentBytes(b, h[0]) - sentBefore) / (1 << 20) * 60 / time.Since(measured).Seconds()
		key := strings.ReplaceAll(c.name, " ", "_") + "/"
		fc := cost.figure(key+"droverd_cpu_percent", cpu)
		vs := "1.00×"
		if c.standby == "" {
			base = fc.Median
		} else if base > 0 {
			vs = fmt.Sprintf("%.2f×", cost.ratio(key+"droverd_cpu_vs_none", fc.Median/base))
		}
		cost.add(c.name, fc.cell("%.2f"), cost.figure(key+"zfs_fuse_cpu_percent", zfs).cell("%.2f"), fmt.Sprintf("%.1f", cost.ratio(key+"sent_mib_per_min", perMinute)), vs)
	}
	report.Sections = append(report.Sections, cost)

	death := &table{
		Title: "Standby: from the owner's death to the service answering",
		How: fmt.Sprintf("The same service with `failover = \"auto\"`, `after = \"0s\"`, refreshed every 10 s. Its owner is killed whole (its link taken down, then every process of the host — droverd, the engine, the container — SIGKILLed); "+
			"a client on the third host asks `/healthz` at the service IP every 100 ms until it answers. The gap is bounded below by the lease (10 s) plus the clock-drift margin (2 s) after the owner's last renewal, then the standby's start. "+
			"The old owner is brought back (link, engine, droverd), sets its copy aside and becomes the standby before the next run. %d runs.", runs),
		Header: []string{"event", "time (s)"},
	}
	deploy("\n[services.sb.standby]\nmachine = \"" + h[1].Name + "\"\ninterval = \"10s\"\nfailover = \"auto\"\nafter = \"0s\"\n")
	ip := serviceNamed(b, d3, "bench", "sb").ServiceIP
	var gaps, windows []float64
	owner, standby := 0, 1
	for r := range runs {
		testpoll.Until(b, 2*time.Minute, "a standby copy on "+h[standby].Name, func() error {
			sv := serviceNamed(b, d3, "bench", "sb")
			if sv.Machine != h[owner].Name || sv.Standby == nil || sv.Standby.Machine != h[standby].Name || sv.Standby.Snapshot == "" {
				return fmt.Errorf("run %d: on %s, standby %+v", r, sv.Machine, sv.Standby)
			}
			return nil
		})
		l := h[owner].Lab()
		if err := l.SetLinkUp(h[owner], false); err != nil {
			b.Fatal(err)
		}
		if err := l.Kill(h[owner]); err != nil {
			b.Fatal(err)
		}
		killed := time.Now()
		answered := func() bool {
			_, err := h[2].Run(context.Background(), "curl", "-sf", "-m", "1", "http://"+ip+":80/healthz")
			return err == nil
		}
		for !answered() && time.Since(killed) < 50*time.Second {
			time.Sleep(100 * time.Millisecond)
		}
		if !answered() {
			services, _ := d3.ctl("service", "ls", "--json")
			machines, _ := d3.ctl("machine", "ls")
			b.Fatalf("run %d: the service does not answer 50 s after its owner died:\n%s\n%s", r, services, machines)
		}
		gaps = append(gaps, time.Since(killed).Seconds())
		sv := serviceNamed(b, d3, "bench", "sb")
		windows = append(windows, sv.LastFailoverAt.Sub(killed).Seconds())
		if err := l.SetLinkUp(h[owner], true); err != nil {
			b.Fatal(err)
		}
		if err := l.StartDocker(h[owner]); err != nil {
			b.Fatal(err)
		}
		daemons[owner].start(b)
		owner, standby = standby, owner
	}
	death.add("owner killed → failover committed", death.figure("killed_to_failover_s", windows).cell("%.2f"))
	death.add("owner killed → service answers on its standby", death.figure("killed_to_answer_s", gaps).cell("%.2f"))
	report.Sections = append(report.Sections, death)
	if b.Failed() {
		return
	}
	report.Took = time.Since(report.Started).Round(time.Second).String()
	if err := report.write(envOr("DROVER_BENCH_OUT", "../bench/results")); err != nil {
		b.Fatal(err)
	}
}

// sentBytes reads a host's drover_standby_sent_bytes_total (all services).
func sentBytes(b testing.TB, host *lab.Host) float64 {
	out, err := host.Run(context.Background(), "curl", "-sf", "-m", "5", "http://127.0.0.1:9477/metrics")
	if err != nil {
		b.Fatalf("metrics of %s: %v", host.Name, err)
	}
	var sum float64
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "drover_standby_sent_bytes_total{") {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
}
