package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

func (c *cli) clusterCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "The cluster: create, join, status"}
	cmd.AddCommand(
		c.addJSON(&cobra.Command{
			Use:   "status",
			Short: "Show the Raft leader, term, indexes, voters and non-voters",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				st, err := c.client.Status(cmd.Context())
				if err != nil {
					return err
				}
				if c.json {
					return c.printJSON(st)
				}
				return c.printStatus(st)
			},
		}),
		&cobra.Command{
			Use:   "init",
			Short: "Start a new cluster with this machine as its first member",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				st, err := c.client.Init(cmd.Context())
				if err != nil {
					return err
				}
				fmt.Fprintf(c.out, "cluster created; %s leads it\n", st.MachineName)
				fmt.Fprintln(cmd.ErrOrStderr(), "add machines with: droverctl cluster join-token (here), then droverctl cluster join TOKEN (there)")
				return nil
			},
		},
		c.addJSON(&cobra.Command{
			Use:   "join-token",
			Short: "Print a token another machine joins with (a secret: it holds the cluster key)",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				tok, err := c.client.JoinToken(cmd.Context())
				if err != nil {
					return err
				}
				if c.json {
					return c.printJSON(tok)
				}
				fmt.Fprintln(c.out, tok.Token)
				fmt.Fprintln(cmd.ErrOrStderr(), "keep this token secret: it carries the cluster key")
				return nil
			},
		},
		),
		&cobra.Command{
			Use:   "join TOKEN",
			Short: "Join the cluster a token names",
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				st, err := c.client.Join(cmd.Context(), ctlapi.JoinRequest{Token: args[0]})
				if err != nil {
					return err
				}
				fmt.Fprintf(c.out, "joined; leader is %s, this machine is %s\n", dash(st.LeaderName), st.Role)
				return nil
			},
		},
	)
	return cmd
}

func (c *cli) printStatus(st ctlapi.ClusterStatus) error {
	if !st.Initialized {
		fmt.Fprintf(c.out, "machine %s is in no cluster yet\n", st.MachineName)
		return nil
	}
	fmt.Fprintf(c.out, "machine:       %s (%s)\n", st.MachineName, st.Role)
	fmt.Fprintf(c.out, "leader:        %s %s\n", dash(st.LeaderName), st.LeaderAddr)
	fmt.Fprintf(c.out, "term:          %d\n", st.Term)
	fmt.Fprintf(c.out, "commit index:  %d\n", st.CommitIndex)
	fmt.Fprintf(c.out, "applied index: %d\n\n", st.AppliedIndex)
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVER\tADDRESS\tSUFFRAGE\tLEADER")
	for _, s := range append(append([]ctlapi.RaftServer{}, st.Voters...), st.NonVoters...) {
		lead := ""
		if s.Leader {
			lead = "*"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.Name, s.Address, s.Suffrage, lead)
	}
	return tw.Flush()
}
