package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

func (c *cli) migrateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "migrate", Short: "Move services and their volumes between machines"}
	var to string
	apply := c.addJSON(&cobra.Command{
		Use:   "apply NAMESPACE/SERVICE --to MACHINE",
		Short: "Move a service: warm copy while it runs, stop, final delta, start on the target, commit",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("give the target with --to MACHINE")
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "moving %s to %s...\n", args[0], to)
			m, err := c.client.Migrate(cmd.Context(), ctlapi.MigrateRequest{Service: args[0], To: to})
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(m)
			}
			fmt.Fprintf(c.out, "migration %s: %s moved from %s to %s, %s; downtime %s\n",
				m.ID, m.Service, m.Source, m.Target, m.Phase, time.Duration(m.Downtime).Round(time.Millisecond))
			for _, v := range m.Volumes {
				fmt.Fprintf(c.out, "  volume %s: %s sent, last snapshot %s\n", v.Name, mib(v.BytesSent), v.Snapshot)
			}
			return nil
		},
	})
	apply.Flags().StringVar(&to, "to", "", "the target machine")
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
	var previewTo string
	preview := c.addJSON(&cobra.Command{
		Use:   "preview NAMESPACE/SERVICE --to MACHINE",
		Short: "Show the plan and the pre-flight checks of a migration; change nothing",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if previewTo == "" {
				return fmt.Errorf("give the target with --to MACHINE")
			}
			p, err := c.client.MigratePreview(cmd.Context(), ctlapi.MigrateRequest{Service: args[0], To: previewTo})
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
			fmt.Fprintf(c.out, "\nafter: %s\n", p.After)
			if !p.OK {
				return fmt.Errorf("pre-flight fails: apply would refuse")
			}
			return nil
		},
	})
	preview.Flags().StringVar(&previewTo, "to", "", "the target machine")
	cmd.AddCommand(apply, preview, ls)
	return cmd
}
