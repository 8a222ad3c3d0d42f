package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

func (c *cli) migrateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "migrate", Short: "Move services and their volumes between machines"}
	var applyTo, previewTo, renderTo string
	var applyBudget, previewBudget time.Duration
	apply := c.addJSON(&cobra.Command{
		Use:   "apply NAMESPACE/SERVICE --to MACHINE",
		Short: "Move a service: warm copy while it runs, stop, final delta, start on the target, commit",
		Long: `Move a service and its volumes to another machine and wait for the outcome.

On a terminal the progress is shown live; otherwise one line per event, or
JSON lines with --json. Ctrl-C asks whether to abort, SIGTERM aborts (before the commit the
service goes back to its source; after it the move only goes forward).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if applyTo == "" {
				return fmt.Errorf("give the target with --to MACHINE")
			}
			return c.followMigration(cmd, func(ctx context.Context, onEvent func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
				return c.client.Migrate(ctx, ctlapi.MigrateRequest{Service: args[0], To: applyTo, MaxDowntime: budgetFlag(applyBudget)}, onEvent)
			})
		},
	})
	apply.Flags().StringVar(&applyTo, "to", "", "the target machine")
	apply.Flags().DurationVar(&applyBudget, "max-downtime", time.Duration(ctlapi.DefaultMaxDowntime),
		"the downtime budget: copy while it runs until the predicted downtime fits, or end the move before the source stops (0: no budget)")
	rollback := c.addJSON(&cobra.Command{
		Use:   "rollback MIGRATION",
		Short: "Move a migrated service back inside the safety window, sending only what changed since",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.followMigration(cmd, func(ctx context.Context, onEvent func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
				return c.client.Rollback(ctx, args[0], onEvent)
			})
		},
	})
	ls := c.addJSON(&cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List migrations: phase, bytes, downtime, error", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ms, err := c.client.Migrations(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(ms)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tSERVICE\tFROM\tTO\tPHASE\tSENT\tDOWNTIME\tERROR")
			for _, m := range ms {
				var sent uint64
				for _, v := range m.Volumes {
					sent += v.BytesSent
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Service, m.Source, m.Target, m.Phase,
					mib(sent), time.Duration(m.Downtime).Round(time.Millisecond), dash(m.Error))
			}
			return tw.Flush()
		},
	})
	show := c.addJSON(&cobra.Command{
		Use: "show MIGRATION", Short: "One migration in full: phases' times, bytes per volume, downtime, error", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := c.client.Migration(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(m)
			}
			printMigration(c.out, m)
			return nil
		},
	})
	purge := c.addJSON(&cobra.Command{
		Use: "purge-source MIGRATION", Short: "Destroy the copy a done migration kept on its source (no rollback after)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := c.client.PurgeSource(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(m)
			}
			fmt.Fprintf(c.out, "migration %s: the copy of %s on %s is destroyed\n", m.ID, m.Service, m.Source)
			return nil
		},
	})
	abort := c.addJSON(&cobra.Command{
		Use: "abort MIGRATION", Short: "Abort a running migration before its commit (on the machine running it)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := c.client.AbortMigration(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(m)
			}
			fmt.Fprintf(c.out, "migration %s: %s\n", m.ID, m.Phase)
			return nil
		},
	})
	preview := c.addJSON(&cobra.Command{
		Use:   "preview NAMESPACE/SERVICE --to MACHINE",
		Short: "Show the plan and the pre-flight checks of a migration; change nothing",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if previewTo == "" {
				return fmt.Errorf("give the target with --to MACHINE")
			}
			p, err := c.client.MigratePreview(cmd.Context(), ctlapi.MigrateRequest{Service: args[0], To: previewTo, MaxDowntime: budgetFlag(previewBudget)})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(p)
			}
			fmt.Fprintf(c.out, "move %s from %s to %s\n\nvolumes:\n", p.Service, p.Source, p.Target)
			for _, v := range p.Volumes {
				fmt.Fprintf(c.out, "  %s  %s referenced  incremental base: %s\n", v.Name, mib(v.ReferencedBytes), dash(v.IncrementalBase))
			}
			fmt.Fprintln(c.out, "\npre-flight:")
			for _, ch := range p.Checks {
				mark := "ok  "
				if !ch.OK {
					mark = "FAIL"
				}
				fmt.Fprintf(c.out, "  %s %s: %s\n", mark, ch.Name, ch.Detail)
			}
			fmt.Fprintln(c.out, "\nphases:")
			for i, ph := range p.Phases {
				fmt.Fprintf(c.out, "  %d. %s\n", i+1, ph)
			}
			budget := "no budget"
			if p.MaxDowntime > 0 {
				budget = "budget " + time.Duration(p.MaxDowntime).String()
			}
			fmt.Fprintf(c.out, "\npredicted downtime: %s fixed cost (%s) plus the final increment's send, which the warm copy keeps within the %s\n",
				time.Duration(p.PredictedDowntime).Round(time.Millisecond), p.FixedCostFrom, budget)
			fmt.Fprintf(c.out, "\nafter: %s\n", p.After)
			if !p.OK {
				var failed []string
				for _, ch := range p.Checks {
					if !ch.OK {
						failed = append(failed, ch.Name+" ("+ch.Detail+")")
					}
				}
				return fmt.Errorf("pre-flight fails, apply would refuse: %s", strings.Join(failed, "; "))
			}
			return nil
		},
	})
	preview.Flags().StringVar(&previewTo, "to", "", "the target machine")
	preview.Flags().DurationVar(&previewBudget, "max-downtime", time.Duration(ctlapi.DefaultMaxDowntime), "the downtime budget to check (0: no budget)")
	render := &cobra.Command{
		Use:   "render-manifest NAMESPACE/SERVICE --to MACHINE",
		Short: "Print the manifest that performs this migration with `droverctl deploy -f`",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if renderTo == "" {
				return fmt.Errorf("give the target with --to MACHINE")
			}
			m, err := c.client.RenderManifest(cmd.Context(), ctlapi.MigrateRequest{Service: args[0], To: renderTo})
			if err != nil {
				return err
			}
			_, err = io.WriteString(c.out, m.Text)
			return err
		},
	}
	render.Flags().StringVar(&renderTo, "to", "", "the target machine")
	cmd.AddCommand(apply, preview, render, ls, show, rollback, purge, abort)
	return cmd
}

// followMigration runs a migration request and shows its events: live on
// a terminal, one line each otherwise, JSON lines with --json. Ctrl-C
// asks whether to abort (without a terminal to ask on, it aborts).
func (c *cli) followMigration(cmd *cobra.Command, run func(context.Context, func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error)) error {
	stderr := cmd.ErrOrStderr()
	tty := isTerminal(os.Stdout) && isTerminal(os.Stdin)
	var mu sync.Mutex
	var id string
	show := newProgress(c.out, tty && !c.json)
	onEvent := func(ev ctlapi.MigrationEvent) {
		mu.Lock()
		id = ev.ID
		mu.Unlock()
		if c.json {
			json.NewEncoder(c.out).Encode(ctlapi.MigrateStreamLine{Event: &ev})
			return
		}
		show.event(ev)
	}
	// The migration belongs to the daemon: an interrupt here must not
	// drop the request, only ask the daemon to abort.
	ctx := context.WithoutCancel(cmd.Context())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			var sig os.Signal
			select {
			case <-stop:
				return
			case sig = <-sigs:
			}
			mu.Lock()
			current := id
			mu.Unlock()
			if current == "" {
				continue
			}
			// SIGTERM (a `timeout`, a service manager) aborts without
			// asking; Ctrl-C on a terminal asks.
			if sig == os.Interrupt && tty && !confirm(stderr, fmt.Sprintf("\nabort migration %s? [y/N] ", current)) {
				continue
			}
			if _, err := c.client.AbortMigration(ctx, current); err != nil {
				fmt.Fprintf(stderr, "not aborted: %v\n", err)
			}
		}
	}()
	info, err := run(ctx, onEvent)
	show.end()
	if c.json {
		line := ctlapi.MigrateStreamLine{Result: &info}
		if err != nil {
			line.Error = &ctlapi.ErrorBody{Error: err.Error()}
			var apiErr *ctlapi.APIError
			if errors.As(err, &apiErr) {
				line.Error.Code = apiErr.Code
			}
		}
		json.NewEncoder(c.out).Encode(line)
		if err != nil {
			return fmt.Errorf("migration failed (see the last JSON line)")
		}
		return nil
	}
	if errors.Is(err, ctlapi.ErrStreamCut) {
		return fmt.Errorf("%w (the migration is the daemon's: see `droverctl migrate ls`)", err)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(c.out, "migration %s: %s moved from %s to %s, %s; downtime %s (source stopped to target ready)\n",
		info.ID, info.Service, info.Source, info.Target, info.Phase, time.Duration(info.Downtime).Round(time.Millisecond))
	if info.Cutover != nil {
		fmt.Fprintf(c.out, "  cutover: %s\n", info.Cutover)
	}
	for _, v := range info.Volumes {
		fmt.Fprintf(c.out, "  volume %s: %s sent, %s of it after the source stopped\n", v.Name, mib(v.BytesSent), mib(v.FinalBytes))
	}
	return nil
}

// budgetFlag turns --max-downtime into the request's budget: 0 is none.
func budgetFlag(d time.Duration) ctlapi.Duration {
	if d <= 0 {
		return ctlapi.NoDowntimeBudget
	}
	return ctlapi.Duration(d)
}

// progress shows migration events: on a terminal one line rewritten in
// place for transfers, otherwise a line per event.
type progress struct {
	w    io.Writer
	live bool
	open bool // a live line is on screen
}

func newProgress(w io.Writer, live bool) *progress { return &progress{w: w, live: live} }

func (p *progress) event(ev ctlapi.MigrationEvent) {
	stamp := ev.Time.Local().Format("15:04:05.000")
	if ev.Kind != "progress" {
		p.end()
		fmt.Fprintf(p.w, "%s  %-15s %s\n", stamp, ev.Phase, ev.Message)
		return
	}
	round := fmt.Sprintf("round %d ", ev.Round)
	switch {
	case ev.Phase == "image": // a pull's layer, or the image streamed from the source
		round = ""
	case ev.Round == 0:
		round = "final "
	}
	line := fmt.Sprintf("%-15s %s%s: %s", ev.Phase, round, ev.Volume, mib(ev.Bytes))
	if ev.Total > 0 {
		line += " / " + mib(ev.Total)
	}
	if ev.Rate > 0 {
		line += fmt.Sprintf("  %s/s", mib(uint64(ev.Rate)))
		if ev.Total > ev.Bytes {
			line += "  ETA " + (time.Duration(float64(ev.Total-ev.Bytes)/ev.Rate) * time.Second).Round(time.Second).String()
		}
	}
	if p.live {
		fmt.Fprintf(p.w, "\r\033[K%s  %s", stamp, line)
		p.open = true
		return
	}
	fmt.Fprintf(p.w, "%s  %s\n", stamp, line)
}

func (p *progress) end() {
	if p.open {
		fmt.Fprintln(p.w)
		p.open = false
	}
}

func printMigration(w io.Writer, m ctlapi.MigrationInfo) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s\t%s\n", k, v) }
	at := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.Local().Format(time.RFC3339Nano)
	}
	row("id", m.ID)
	row("service", m.Service)
	row("from", m.Source)
	row("to", m.Target)
	row("run by", m.Executor)
	row("phase", m.Phase)
	if m.RollbackOf != "" {
		row("rolls back", m.RollbackOf)
	}
	row("started", at(m.StartedAt))
	row("source stopped", at(m.SourceStopped))
	row("target ready", at(m.TargetReady))
	row("committed", at(m.CommittedAt))
	row("ended", at(m.EndedAt))
	row("downtime", time.Duration(m.Downtime).Round(time.Millisecond).String())
	if c := m.Cutover; c != nil {
		d := func(v ctlapi.Duration) string { return time.Duration(v).Round(time.Millisecond).String() }
		row("  prepared before the stop", d(c.Prepared)+" (copies in place, container created)")
		row("  stop", d(c.Stop))
		row("  final snapshot", d(c.FinalSnapshot))
		row("  final send", fmt.Sprintf("%s (%s)", d(c.FinalSend), mib(c.FinalBytes)))
		row("  adopt", d(c.Adopt))
		if c.Held {
			row("  release of the held container", d(c.Start))
		} else {
			row("  container start", d(c.Start))
		}
		row("  ready", d(c.Ready))
		row("  commit", d(c.Commit))
		row("  stop to commit", d(c.Total))
	}
	if !m.RetainedUntil.IsZero() {
		row("source copy kept until", at(m.RetainedUntil))
	}
	if !m.SourcePurgedAt.IsZero() {
		row("source copy purged", at(m.SourcePurgedAt))
	}
	row("error", dash(m.Error))
	for _, v := range m.Volumes {
		row("volume "+v.Name, fmt.Sprintf("%s sent (%s final), size %s, base %s", mib(v.BytesSent), mib(v.FinalBytes), mib(v.TotalBytes), dash(v.Base)))
	}
	tw.Flush()
}

// confirm asks a yes/no question on the terminal.
func confirm(w io.Writer, question string) bool {
	fmt.Fprint(w, question)
	answer, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	return strings.HasPrefix(strings.ToLower(strings.TrimSpace(answer)), "y")
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
