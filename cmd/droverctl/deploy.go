package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

func (c *cli) deployCmd() *cobra.Command {
	var file string
	read := func() (ctlapi.DeployRequest, error) {
		if file == "" {
			return ctlapi.DeployRequest{}, fmt.Errorf("give the manifest with -f FILE")
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return ctlapi.DeployRequest{}, fmt.Errorf("reading manifest: %w", err)
		}
		return ctlapi.DeployRequest{File: file, Manifest: string(b)}, nil
	}
	cmd := c.addJSON(&cobra.Command{
		Use:   "deploy -f FILE",
		Short: "Apply a manifest under its namespace's lock; wait until its services are ready",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req, err := read()
			if err != nil {
				return err
			}
			progress := newBoard(cmd.ErrOrStderr())
			res, err := c.client.Deploy(cmd.Context(), req, c.deployProgress(progress))
			progress.done()
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(res)
			}
			c.printPlan(res.Plan)
			fmt.Fprintln(c.out)
			for _, m := range res.Migrations {
				fmt.Fprintf(c.out, "migration %s: %s moved from %s to %s, %s; downtime %s\n",
					m.ID, m.Service, m.Source, m.Target, m.Phase, time.Duration(m.Downtime).Round(time.Millisecond))
			}
			return c.printServices(res.Services)
		},
	})
	cmd.Flags().StringVarP(&file, "file", "f", "", "the manifest (TOML)")
	preview := c.addJSON(&cobra.Command{
		Use:   "preview -f FILE",
		Short: "Show what a manifest would change; change nothing",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req, err := read()
			if err != nil {
				return err
			}
			plan, err := c.client.DeployPreview(cmd.Context(), req)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(plan)
			}
			c.printPlan(plan)
			return nil
		},
	})
	preview.Flags().StringVarP(&file, "file", "f", "", "the manifest (TOML)")
	cmd.AddCommand(preview)
	var withVolumes bool
	rm := c.addJSON(&cobra.Command{
		Use:   "rm NAMESPACE",
		Short: "Remove every service of a namespace (under its lock); their volumes stay where they are unless --volumes",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := c.client.RemoveNamespace(cmd.Context(), args[0], ctlapi.RemoveRequest{Volumes: withVolumes})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(r)
			}
			fmt.Fprintf(c.out, "removed from %s: %s\n", r.Namespace, dashList(r.Services))
			if withVolumes {
				fmt.Fprintf(c.out, "volumes destroyed: %s\n", dashList(r.VolumesDestroyed))
			} else {
				fmt.Fprintf(c.out, "volumes kept: %s\n", dashList(r.VolumesKept))
			}
			return nil
		},
	})
	rm.Flags().BoolVar(&withVolumes, "volumes", false, "destroy the namespace's volumes too (their datasets, on their owners): the data is gone")
	cmd.AddCommand(rm)
	return cmd
}

func (c *cli) printPlan(p ctlapi.DeployPlan) {
	fmt.Fprintf(c.out, "namespace %s\n", p.Namespace)
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tACTION\tMACHINE\tSERVICE-IP\tGENERATION\tNEW-VOLUMES\tCHANGES")
	for _, s := range p.Services {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", s.Name, s.Action, s.Machine, dash(s.ServiceIP), s.Generation,
			dash(strings.Join(s.CreateVolumes, ", ")), dash(strings.Join(s.Changes, ",")))
	}
	tw.Flush()
	for _, s := range p.Services {
		if s.ImageRef != "" && s.ImageRef != s.Image {
			fmt.Fprintf(c.out, "image of %s: %s -> %s\n", s.Name, s.Image, s.ImageRef)
		}
	}
	for _, w := range p.Warnings {
		fmt.Fprintf(c.out, "warning: %s\n", w)
	}
}

func (c *cli) printServices(ss []ctlapi.Service) error {
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tMACHINE\tSTATE\tSERVICE-IP\tREADY\tGENERATION\tRESTARTS\tLAST-EXIT\tSTANDBY")
	for _, s := range ss {
		state := s.State
		if s.Process != "" && s.Process != "running" {
			state += " (" + s.Process + ")"
		}
		if s.Error != "" {
			state += ": " + s.Error
		}
		last := "-"
		if e := s.LastExit; e != nil {
			last = fmt.Sprintf("%d %s ago", e.Code, time.Since(e.At).Round(time.Second))
			if e.Reason != "" {
				last += " (" + e.Reason + ")"
			}
		}
		standby := "-"
		if sb := s.Standby; sb != nil {
			standby = sb.Machine + " (no copy yet)"
			if sb.Snapshot != "" {
				standby = fmt.Sprintf("%s (lag %s, %s)", sb.Machine, time.Duration(sb.Lag).Round(100*time.Millisecond), sb.Failover)
			}
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%v\t%d\t%d\t%s\t%s\n", s.Namespace, s.Name, s.Machine, state, s.ServiceIP, s.Ready, s.Generation, s.Restarts, last, standby)
	}
	defer func() {
		for _, s := range ss {
			if s.LastFailover != "" {
				fmt.Fprintf(c.out, "%s/%s failed over: %s\n", s.Namespace, s.Name, s.LastFailover)
			}
		}
	}()
	return tw.Flush()
}

func (c *cli) serviceCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "service", Short: "Services"}
	cmd.AddCommand(c.addJSON(&cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List services: machine, state, service IP, ready", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ss, err := c.client.Services(cmd.Context())
			if err != nil {
				return err
			}
			c.warnIfStale(cmd.Context())
			if c.json {
				return c.printJSON(ss)
			}
			return c.printServices(ss)
		},
	}))
	cmd.AddCommand(c.serviceLogsCmd())
	var to string
	failover := c.addJSON(&cobra.Command{
		Use:   "failover NAMESPACE/SERVICE [--to MACHINE]",
		Short: "Start a service on its standby when its machine is gone (after that machine's lease ran out); says what may be lost",
		Long: `Fail a service over to its standby: one Raft command moves it and its
volumes to the standby, which starts it on its newest copy. Refused while
the service's machine is alive (move it with migrate instead), while that
machine's lease has not run out (it may still be serving on the far side
of a partition), or when the service has no standby with a copy. The
loss window is the age of that copy at the failover: what the old
machine wrote after its snapshot is not on the new one (the old machine
keeps it aside when it comes back, and says how much it was).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := c.client.Failover(cmd.Context(), ctlapi.FailoverRequest{Service: args[0], To: to})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(r)
			}
			fmt.Fprintf(c.out, "%s failed over from %s to %s, ready after %s\n", r.Service, r.From, r.To, time.Duration(r.Took).Round(time.Millisecond))
			fmt.Fprintf(c.out, "started from %s, taken %s: writes after it on %s are not here (loss window %s)\n",
				r.Snapshot, r.SnapshotTakenAt.Local().Format("15:04:05.000"), r.From, time.Duration(r.LossWindow).Round(time.Millisecond))
			return nil
		},
	})
	failover.Flags().StringVar(&to, "to", "", "the standby (default: the service's standby)")
	cmd.AddCommand(failover)
	cmd.AddCommand(c.addJSON(&cobra.Command{
		Use:   "restart NAMESPACE/SERVICE",
		Short: "Restart a service's container where it runs (under the namespace lock) and wait until it is ready",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := c.client.RestartService(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(r)
			}
			fmt.Fprintf(c.out, "%s restarted on %s, ready after %s\n", r.Service, r.Machine, time.Duration(r.Took).Round(time.Millisecond))
			return nil
		},
	}))
	return cmd
}

func (c *cli) serviceLogsCmd() *cobra.Command {
	var follow, stamps bool
	var since time.Duration
	var tail int
	logs := c.addJSON(&cobra.Command{
		Use:   "logs NAMESPACE/SERVICE",
		Short: "A service's log, from any machine; with -f it follows the service across moves and restarts",
		Long: `Print a service's log (its container's stdout and stderr) from whichever
machine runs it. With -f it goes on until Ctrl-C, and follows the service
when it moves: the lines of the old machine up to its stop, then the new
machine's, none lost or shown twice. --json prints one object per line
(time, machine, stream, text).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if tail < 0 {
				return fmt.Errorf("--tail %d: want 0 (all) or more", tail)
			}
			req := ctlapi.LogsRequest{Service: args[0], Follow: follow, Tail: tail}
			if since > 0 {
				req.Since = time.Now().Add(-since)
			}
			enc := json.NewEncoder(c.out)
			machine := ""
			_, err := c.client.ServiceLogs(cmd.Context(), req, func(l ctlapi.LogLine) {
				if machine != "" && l.Machine != machine {
					fmt.Fprintf(c.errOut, "-- %s now runs on %s --\n", args[0], l.Machine)
				}
				machine = l.Machine
				switch {
				case c.json:
					enc.Encode(l)
				case stamps:
					fmt.Fprintf(c.out, "%s %s\n", l.Time.Local().Format(time.RFC3339Nano), l.Text)
				default:
					fmt.Fprintln(c.out, l.Text)
				}
			})
			if err != nil && cmd.Context().Err() != nil {
				return nil // Ctrl-C ends a follow
			}
			return err
		},
	})
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "go on with the lines to come, across moves, until Ctrl-C")
	logs.Flags().DurationVar(&since, "since", 0, "only lines of the last D (e.g. 10m)")
	logs.Flags().IntVar(&tail, "tail", 0, "only the last N lines (0: all)")
	logs.Flags().BoolVarP(&stamps, "timestamps", "t", false, "print each line's time")
	return logs
}

func (c *cli) volumeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "Volumes"}
	cmd.AddCommand(c.addJSON(&cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List volumes: owner, size, newest snapshot", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			vs, err := c.client.Volumes(cmd.Context())
			if err != nil {
				return err
			}
			c.warnIfStale(cmd.Context())
			if c.json {
				return c.printJSON(vs)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "VOLUME\tOWNER\tQUOTA\tUSED\tNEWEST-SNAPSHOT\tSTANDBY\tLAG")
			for _, v := range vs {
				used := "-"
				if v.Dataset != "" {
					used = mib(v.UsedBytes)
				}
				lag := "-"
				if v.Standby != "" {
					lag = "no copy yet"
					if v.Lag > 0 {
						lag = time.Duration(v.Lag).Round(100 * time.Millisecond).String()
					}
				}
				fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Namespace, v.Name, v.Owner, mib(v.QuotaBytes), used, dash(v.NewestSnapshot), dash(v.Standby), lag)
			}
			return tw.Flush()
		},
	}))
	return cmd
}

func mib(b uint64) string { return fmt.Sprintf("%.1fMiB", float64(b)/(1<<20)) }

// deployProgress shows a deploy's pulls on w: a line per layer step, the
// bytes when the engine counts them.
// deployProgress shows a deploy's pulls and readiness, a line per service
// and machine (see board).
func (c *cli) deployProgress(b *board) func(ctlapi.DeployEvent) {
	waitingSince := map[string]time.Time{}
	return func(ev ctlapi.DeployEvent) {
		key := ev.Service + " on " + ev.Machine
		at := ev.Time.Local().Format("15:04:05.000")
		var state string
		switch ev.Kind {
		case "waiting":
			waitingSince[key] = ev.Time
			state = "waiting to be ready"
		case "ready":
			state = "ready"
			if since, ok := waitingSince[key]; ok {
				state += fmt.Sprintf(" after %s", ev.Time.Sub(since).Round(time.Millisecond))
			}
		default:
			state = "pulling"
			if ev.Layer != "" {
				state += " " + ev.Layer
			}
			state += " " + ev.Message
		}
		line := fmt.Sprintf("%s  %s: %s", at, key, state)
		if ev.Kind == "pull" && ev.Total > 0 {
			line += fmt.Sprintf(" %s / %s", mib(uint64(ev.Bytes)), mib(uint64(ev.Total)))
		}
		b.set(key, state, line)
	}
}

// dashList joins a list, or says none.
func dashList(xs []string) string {
	if len(xs) == 0 {
		return "none"
	}
	return strings.Join(xs, ", ")
}
