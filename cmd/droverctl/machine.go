package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

func (c *cli) machineCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "machine", Short: "Machines of the cluster"}
	cmd.AddCommand(c.addJSON(&cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List machines: address, state, liveness, Raft role, last contact",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ms, err := c.client.Machines(cmd.Context())
			if err != nil {
				return err
			}
			c.warnIfStale(cmd.Context())
			if c.json {
				return c.printJSON(ms)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tID\tADDRESS\tOVERLAY\tSTATE\tLIVENESS\tRAFT\tLAST-CONTACT\tHANDSHAKE\tDRAIN")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, short(m.ID), m.GossipAddr,
					dash(m.OverlayIP), m.State, m.Liveness, m.RaftRole, ago(m.LastContact), ago(m.LastHandshake), drainSummary(m.Drain))
			}
			return tw.Flush()
		},
	}))
	cmd.AddCommand(&cobra.Command{
		Use:   "activate MACHINE",
		Short: "Mark a machine active: it takes placements again (\"self\" is this machine)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := c.client.Activate(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "%s is %s\n", m.Name, m.State)
			return nil
		},
	})
	cmd.AddCommand(c.drainCmd(), c.removeCmd())
	return cmd
}

// drainSummary is the DRAIN column: the latest drain's state and progress.
func drainSummary(d *ctlapi.DrainInfo) string {
	if d == nil {
		return "-"
	}
	s := fmt.Sprintf("%s %d/%d moved", d.State, d.Moved, len(d.Items))
	if d.State == "running" {
		migrating := 0
		for _, it := range d.Items {
			if it.State == "migrating" {
				migrating++
			}
		}
		s += fmt.Sprintf(", %d migrating", migrating)
	}
	if d.Left > 0 && d.State != "running" {
		s += fmt.Sprintf(", %d left", d.Left)
	}
	return s
}

func (c *cli) drainCmd() *cobra.Command {
	var req ctlapi.DrainRequest
	var deadline time.Duration
	cmd := c.addJSON(&cobra.Command{
		Use:   "drain MACHINE",
		Short: "Move every service off a machine (\"self\" is this machine); it takes no new placements",
		Long: `Mark a machine draining (no new placements), give every service on it a
target by free pool space and memory, and migrate them, at most --parallel
at a time. Services that cannot move (bind mounts, no machine with room)
stay running and are listed with the reason. The drain ends drained only
when nothing is left; it is a fact, so a restarted daemon resumes it.

Without --wait the drain runs in the background (see machine ls); with
--wait the command follows it and exits non-zero unless it ended drained.
When --deadline passes no migration starts any more, running ones abort
unless committed (committed ones finish), and what is left is reported.
Running drain again on a draining machine follows the drain that runs.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Machine, req.Deadline = args[0], ctlapi.Duration(deadline)
			progress := newBoard(c.out)
			c.drainBoard = progress
			info, err := c.client.Drain(cmd.Context(), req, c.printDrainEvent)
			progress.done()
			if errors.Is(err, ctlapi.ErrStreamCut) && req.Wait {
				// The daemon went away (a crash, a restart): the drain is a
				// fact and resumes when it is back; wait for its end.
				fmt.Fprintf(cmd.ErrOrStderr(), "lost droverd (%v); waiting for it to resume the drain\n", err)
				info, err = c.awaitDrain(cmd.Context(), req.Machine)
			}
			if info.Machine != "" {
				if perr := c.printDrain(info, req); perr != nil {
					return perr
				}
			}
			return err
		},
	})
	cmd.Flags().DurationVar(&deadline, "deadline", 0, "stop starting migrations after this long and report what is left (0: none)")
	cmd.Flags().IntVar(&req.Parallel, "parallel", 1, "migrations at a time")
	cmd.Flags().BoolVar(&req.DryRun, "dry-run", false, "print the plan, change nothing")
	cmd.Flags().BoolVar(&req.Wait, "wait", false, "follow the drain until it ends; exit non-zero unless drained")
	return cmd
}

// awaitDrain polls a drain until it ends, riding out a daemon that is
// down for a while; it fails unless the drain ends drained.
func (c *cli) awaitDrain(ctx context.Context, machine string) (ctlapi.DrainInfo, error) {
	last := map[string]string{}
	for {
		d, err := c.client.DrainStatus(ctx, machine)
		if err == nil {
			for _, it := range d.Items {
				if last[it.Service] != it.State {
					last[it.Service] = it.State
					c.printDrainEvent(ctlapi.DrainEvent{Time: time.Now(), Service: it.Service, Target: it.Target, State: it.State, Message: it.Reason})
				}
			}
			switch d.State {
			case "running":
			case "drained":
				return d, nil
			default:
				return d, fmt.Errorf("drain of %s ended %s: %s; %d of %d services left", d.Machine, d.State, d.Note, d.Left, len(d.Items))
			}
		}
		select {
		case <-ctx.Done():
			return d, fmt.Errorf("waiting for the drain of %s: %w", machine, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// printDrainEvent shows a drain's events one line each: service states and
// the phases of their migrations (progress lines only with --json).
func (c *cli) printDrainEvent(ev ctlapi.DrainEvent) {
	if c.json {
		json.NewEncoder(c.out).Encode(ev)
		return
	}
	at := ev.Time.Local().Format("15:04:05")
	b := c.drainBoard
	if b == nil {
		b = newBoard(c.out)
		c.drainBoard = b
	}
	m := ev.Migration
	switch {
	case m != nil && m.Kind == "phase":
		state := m.Phase + " " + m.Message
		b.set(ev.Service, state, fmt.Sprintf("%s  %-24s %s", at, ev.Service, state))
	case m != nil:
		// Bytes of a round: shown on a terminal only.
		line := fmt.Sprintf("%s  %-24s %s round %d %s", at, ev.Service, m.Phase, m.Round, mib(m.Bytes))
		if m.Total > 0 {
			line += " / " + mib(m.Total)
		}
		if m.Rate > 0 {
			line += fmt.Sprintf(" at %s/s", mib(uint64(m.Rate)))
		}
		b.set(ev.Service, "", line)
	case ev.Service == "":
		b.set("", ev.State+" "+ev.Message, fmt.Sprintf("%s  drain %s %s", at, ev.State, ev.Message))
	default:
		state := fmt.Sprintf("%s %s %s", ev.State, arrow(ev.Target), ev.Message)
		b.set(ev.Service, state, fmt.Sprintf("%s  %-24s %s", at, ev.Service, state))
	}
}

func arrow(target string) string {
	if target == "" {
		return ""
	}
	return "-> " + target
}

func (c *cli) printDrain(d ctlapi.DrainInfo, req ctlapi.DrainRequest) error {
	if c.json {
		return c.printJSON(d)
	}
	switch {
	case req.DryRun:
		fmt.Fprintf(c.out, "plan to drain %s (%d service(s), %d at a time):\n", d.Machine, len(d.Items), d.Parallel)
	case req.Wait:
		fmt.Fprintf(c.out, "drain of %s %s: %d moved, %d left", d.Machine, d.State, d.Moved, d.Left)
		if d.Note != "" {
			fmt.Fprintf(c.out, " (%s)", d.Note)
		}
		fmt.Fprintln(c.out)
	default:
		fmt.Fprintf(c.out, "draining %s in the background, run by %s: follow with `droverctl machine ls` or `droverctl machine drain %s --wait`\n", d.Machine, d.Executor, req.Machine)
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tTARGET\tSTATE\tMIGRATION\tREASON")
	for _, it := range d.Items {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", it.Service, dash(it.Target), it.State, dash(it.Migration), dash(it.Reason))
	}
	return tw.Flush()
}

func (c *cli) removeCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:     "rm MACHINE",
		Aliases: []string{"remove"},
		Short:   "Remove a drained or dead machine from the cluster (Raft seat, mesh peer, facts)",
		Long: `Remove a machine from the cluster. A live machine must be drained; it is
told to leave and forgets the cluster (its daemon goes on, in no cluster).
A dead machine is removed as it is. While the machine still holds services
or volumes the removal is refused; --force removes it anyway and says what
is lost with it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out, err := c.client.RemoveMachine(cmd.Context(), ctlapi.RemoveMachineRequest{Machine: args[0], Force: force})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "removed %s (%s) from the cluster\n", out.Machine, short(out.ID))
			for _, l := range out.Lost {
				fmt.Fprintf(c.out, "  lost: %s\n", l)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "remove it even though it holds services or volumes: they are lost")
	return cmd
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ago renders a time as a human age: "3s ago".
func ago(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "never"
	}
	d := time.Since(*t)
	switch {
	case d < time.Second:
		return "now"
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	default:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
}
