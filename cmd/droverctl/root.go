package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

// cli holds what every command shares: the client and the output streams.
type cli struct {
	socket string
	json   bool
	out    io.Writer
	errOut io.Writer // diagnostics and warnings
	client *ctlapi.Client
	// drainBoard shows a followed drain's progress.
	drainBoard *board
}

// warnIfStale prints, on stderr, that the facts shown next may be stale
// when this machine is cut off from the leader.
func (c *cli) warnIfStale(ctx context.Context) {
	v, err := c.client.View(ctx)
	if err != nil {
		return // an older daemon: nothing to say
	}
	if w := v.Warning(time.Now()); w != "" {
		fmt.Fprintln(c.errOut, w)
	}
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	c := &cli{out: stdout, errOut: stderr}
	root := &cobra.Command{
		Use:           "droverctl",
		Short:         "Operate drover: machines, the cluster, services and their moves",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(*cobra.Command, []string) {
			c.client = &ctlapi.Client{SocketPath: c.socket}
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().StringVar(&c.socket, "socket", ctlapi.DefaultSocketPath(), "droverd's control socket ($DROVER_SOCKET)")
	root.AddCommand(c.versionCmd(), c.machineCmd(), c.clusterCmd(), c.meshCmd(), c.deployCmd(), c.serviceCmd(), c.volumeCmd(), c.migrateCmd(), c.imageCmd(), c.eventsCmd(), c.secretCmd())
	return root
}

// addJSON gives a read command its --json flag.
func (c *cli) addJSON(cmd *cobra.Command) *cobra.Command {
	cmd.Flags().BoolVar(&c.json, "json", false, "print the result as JSON (a stable format)")
	return cmd
}

func (c *cli) printJSON(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
