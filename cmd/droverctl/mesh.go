package main

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
)

func (c *cli) meshCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "mesh", Short: "The WireGuard mesh between machines"}
	cmd.AddCommand(c.addJSON(&cobra.Command{
		Use:   "status",
		Short: "List this machine's WireGuard peers: endpoint, allowed IPs, last handshake, bytes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := c.client.Mesh(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(st)
			}
			fmt.Fprintf(c.out, "interface %s (%s), address %s, port %d\n\n", st.Interface, st.Kind, dash(st.Address), st.ListenPort)
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MACHINE\tENDPOINT\tALLOWED-IPS\tHANDSHAKE\tRX\tTX")
			for _, p := range st.Peers {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", dash(p.Machine), dash(p.Endpoint),
					dash(strings.Join(p.AllowedIPs, ",")), ago(p.LastHandshake), p.RxBytes, p.TxBytes)
			}
			return tw.Flush()
		},
	}))
	return cmd
}
