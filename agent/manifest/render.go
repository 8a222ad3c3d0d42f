package manifest

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/drover-sh/drover/fsm"
)

// Render writes a namespace's services as a manifest that Parse reads
// back to the same specs. Services named in move get their volumes
// marked `move = true`.
func Render(namespace string, specs []fsm.ServiceSpec, move map[string]bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "namespace = %s\n", strconv.Quote(namespace))
	sorted := append([]fsm.ServiceSpec(nil), specs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	for _, sp := range sorted {
		key := "services." + sp.Name
		fmt.Fprintf(&b, "\n[%s]\nimage = %s\n", key, strconv.Quote(sp.Image))
		if sp.Machine != "" {
			fmt.Fprintf(&b, "machine = %s\n", strconv.Quote(sp.Machine))
		}
		if len(sp.Command) > 0 {
			fmt.Fprintf(&b, "command = %s\n", quoteList(sp.Command))
		}
		if sp.StopSignal != "" {
			fmt.Fprintf(&b, "stop_signal = %s\n", strconv.Quote(sp.StopSignal))
		}
		if sp.StopTimeout > 0 {
			fmt.Fprintf(&b, "stop_timeout = %s\n", strconv.Quote(sp.StopTimeout.String()))
		}
		if len(sp.Flush) > 0 {
			fmt.Fprintf(&b, "flush = %s\n", quoteList(sp.Flush))
		}
		if len(sp.Entrypoint) > 0 {
			fmt.Fprintf(&b, "entrypoint = %s\n", quoteList(sp.Entrypoint))
		}
		if sp.User != "" {
			fmt.Fprintf(&b, "user = %s\n", strconv.Quote(sp.User))
		}
		if sp.WorkingDir != "" {
			fmt.Fprintf(&b, "working_dir = %s\n", strconv.Quote(sp.WorkingDir))
		}
		if sp.ReadOnly {
			b.WriteString("read_only = true\n")
		}
		if len(sp.Labels) > 0 {
			keys := make([]string, 0, len(sp.Labels))
			for k := range sp.Labels {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			pairs := make([]string, len(keys))
			for i, k := range keys {
				pairs[i] = strconv.Quote(k) + " = " + strconv.Quote(sp.Labels[k])
			}
			fmt.Fprintf(&b, "labels = { %s }\n", strings.Join(pairs, ", "))
		}
		if sp.MemoryBytes > 0 {
			fmt.Fprintf(&b, "memory = %d\n", sp.MemoryBytes)
		}
		if sp.MilliCPUs > 0 {
			fmt.Fprintf(&b, "cpus = \"%d.%03d\"\n", sp.MilliCPUs/1000, sp.MilliCPUs%1000)
		}
		if sp.Restart != "" {
			fmt.Fprintf(&b, "restart = %s\n", strconv.Quote(sp.Restart))
		}
		if sp.RestartMax > 0 {
			fmt.Fprintf(&b, "restart_max = %d\n", sp.RestartMax)
		}
		if len(sp.Secrets) > 0 {
			items := make([]string, len(sp.Secrets))
			for i, sm := range sp.Secrets {
				items[i] = fmt.Sprintf("{ name = %s, path = %s, uid = %d, gid = %d, mode = \"%04o\" }", strconv.Quote(sm.Name), strconv.Quote(sm.Path), sm.UID, sm.GID, sm.Mode)
			}
			fmt.Fprintf(&b, "secrets = [%s]\n", strings.Join(items, ", "))
		}
		if len(sp.Env) > 0 {
			keys := make([]string, 0, len(sp.Env))
			for k := range sp.Env {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			pairs := make([]string, len(keys))
			for i, k := range keys {
				pairs[i] = k + " = " + strconv.Quote(sp.Env[k])
			}
			fmt.Fprintf(&b, "env = { %s }\n", strings.Join(pairs, ", "))
		}
		for _, pm := range sp.Ports {
			fmt.Fprintf(&b, "\n[[%s.ports]]\nport = %d\ntarget = %d\nprotocol = %s\n", key, pm.Port, pm.Target, strconv.Quote(pm.Protocol))
		}
		for _, v := range sp.Volumes {
			fmt.Fprintf(&b, "\n[[%s.volumes]]\nname = %s\npath = %s\nquota = %d\n", key, strconv.Quote(v.Name), strconv.Quote(v.MountPath), v.QuotaBytes)
			if v.RecordSize != 0 {
				fmt.Fprintf(&b, "recordsize = %d\n", v.RecordSize)
			}
			if v.Compression != "" {
				fmt.Fprintf(&b, "compression = %s\n", strconv.Quote(v.Compression))
			}
			if move[sp.Name] {
				b.WriteString("move = true\n")
			}
		}
		for _, tm := range sp.Tmpfs {
			fmt.Fprintf(&b, "\n[[%s.tmpfs]]\npath = %s\n", key, strconv.Quote(tm.MountPath))
			if tm.SizeBytes > 0 {
				fmt.Fprintf(&b, "size = %d\n", tm.SizeBytes)
			}
		}
		for _, bm := range sp.Binds {
			fmt.Fprintf(&b, "\n[[%s.binds]]\nhost = %s\npath = %s\n", key, strconv.Quote(bm.HostPath), strconv.Quote(bm.MountPath))
			if bm.ReadOnly {
				b.WriteString("read_only = true\n")
			}
		}
		renderCheck(&b, key+".readiness", sp.Readiness)
		renderCheck(&b, key+".health", sp.Health)
		if st := sp.Standby; st != nil {
			fmt.Fprintf(&b, "\n[%s.standby]\ninterval = %s\n", key, quoteDuration(st.Interval))
			if st.Machine != "" {
				fmt.Fprintf(&b, "machine = %s\n", strconv.Quote(st.Machine))
			}
			if st.Failover != "" {
				fmt.Fprintf(&b, "failover = %s\nafter = %s\n", strconv.Quote(st.Failover), quoteDuration(st.After))
			}
		}
	}
	return b.String()
}

// renderCheck writes a readiness or health check's table.
func renderCheck(b *strings.Builder, key string, rd *fsm.Readiness) {
	if rd != nil {
		fmt.Fprintf(b, "\n[%s]\n", key)
		switch rd.Kind {
		case "http":
			fmt.Fprintf(b, "http = %s\n", strconv.Quote(rd.Path))
		case "tcp":
			b.WriteString("tcp = true\n")
		case "exec":
			fmt.Fprintf(b, "exec = %s\n", quoteList(rd.Command))
		}
		if rd.Kind != "exec" {
			fmt.Fprintf(b, "port = %d\n", rd.Port)
		}
		fmt.Fprintf(b, "interval = %s\ntimeout = %s\nretries = %d\nstart_period = %s\n",
			quoteDuration(rd.Interval), quoteDuration(rd.Timeout), rd.Retries, quoteDuration(rd.StartPeriod))
	}
}

func quoteList(xs []string) string {
	q := make([]string, len(xs))
	for i, x := range xs {
		q[i] = strconv.Quote(x)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

func quoteDuration(d time.Duration) string { return strconv.Quote(d.String()) }
