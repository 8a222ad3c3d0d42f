package main

import (
	"fmt"
	"text/tabwriter"
	"time"

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
			if c.json {
				return c.printJSON(ms)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tID\tADDRESS\tOVERLAY\tSTATE\tLIVENESS\tRAFT\tLAST-CONTACT\tHANDSHAKE")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, short(m.ID), m.GossipAddr,
					dash(m.OverlayIP), m.State, m.Liveness, m.RaftRole, ago(m.LastContact), ago(m.LastHandshake))
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
