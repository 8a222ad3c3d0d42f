package main

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

func (c *cli) eventsCmd() *cobra.Command {
	var follow bool
	cmd := c.addJSON(&cobra.Command{
		Use:   "events",
		Short: "The changes of the facts as they were committed: deploys, migrations and their phases, drains, machines, readiness",
		Long: `Print the changes of the facts this machine kept (the last 1000), oldest
first; with -f, go on with each one as it is committed, until Ctrl-C.
Every machine applies the same log, so every machine tells the same
story. --json prints one object per event.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			enc := json.NewEncoder(c.out)
			_, err := c.client.Events(cmd.Context(), ctlapi.EventsRequest{Follow: follow}, func(ev ctlapi.Event) {
				if c.json {
					enc.Encode(ev)
					return
				}
				fmt.Fprintf(c.out, "%s  %-9s  %-20s  %s\n", ev.Time.Local().Format(time.DateTime), ev.Kind, ev.Subject, ev.Message)
			})
			if err != nil && cmd.Context().Err() != nil {
				return nil // Ctrl-C ends a follow
			}
			return err
		},
	})
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "go on with the events to come, until Ctrl-C")
	return cmd
}
