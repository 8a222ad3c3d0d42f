package main

import (
	"errors"
	"fmt"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

type versionOutput struct {
	Client ctlapi.VersionInfo  `json:"client"`
	Daemon *ctlapi.VersionInfo `json:"daemon,omitempty"`
}

func (c *cli) versionCmd() *cobra.Command {
	return c.addJSON(&cobra.Command{
		Use:   "version",
		Short: "Print droverctl's version and the daemon's",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := versionOutput{Client: ctlapi.VersionInfo{Version: version, APIVersion: ctlapi.APIVersion}}
			d, err := c.client.Version(cmd.Context())
			if err != nil && !errors.Is(err, ctlapi.ErrDaemonNotRunning) {
				return err
			}
			if err == nil {
				out.Daemon = &d
			}
			if c.json {
				return c.printJSON(out)
			}
			fmt.Fprintf(c.out, "droverctl %s (API %s)\n", out.Client.Version, out.Client.APIVersion)
			if out.Daemon != nil {
				fmt.Fprintf(c.out, "droverd   %s (API %s)\n", d.Version, d.APIVersion)
			} else {
				fmt.Fprintln(c.out, "droverd   not running")
			}
			return nil
		},
	})
}
