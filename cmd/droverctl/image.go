package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

func (c *cli) imageCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Images on the machines' engines"}
	var req ctlapi.ImagePushRequest
	push := &cobra.Command{
		Use:   "push IMAGE (--to MACHINE... | --all)",
		Short: "Put an image of this machine's engine on other machines, over the mesh (no registry needed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Image = args[0]
			res, err := c.client.PushImage(cmd.Context(), req)
			if c.json && (err == nil || len(res.Machines) > 0) {
				if perr := c.printJSON(res); perr != nil {
					return perr
				}
				return err
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MACHINE\tMIB\tTOOK\tERROR")
			for _, m := range res.Machines {
				fmt.Fprintf(tw, "%s\t%.1f\t%s\t%s\n", m.Machine, float64(m.Bytes)/(1<<20), time.Duration(m.Took).Round(time.Millisecond), dash(m.Error))
			}
			if len(res.Machines) > 0 {
				tw.Flush()
			}
			return err
		},
	}
	push.Flags().StringSliceVar(&req.To, "to", nil, "machines to push to (repeat, or comma-separated)")
	push.Flags().BoolVar(&req.All, "all", false, "push to every other machine")
	cmd.AddCommand(c.addJSON(push))
	return cmd
}
