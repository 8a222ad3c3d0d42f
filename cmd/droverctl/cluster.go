package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

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
				fmt.Fprintln(cmd.ErrOrStderr(), "add machines with: droverctl cluster join-token (here), then droverctl cluster join --token-file FILE (there, or the token on stdin)")
				return nil
			},
		},
		c.joinTokenCmd(),
		c.rotateKeyCmd(),
		c.joinCmd(),
		c.probeCmd(),
	)
	return cmd
}

// joinTokenCmd issues a join token: a grant in the facts, and the token
// that carries its secret and the cluster key.
func (c *cli) joinTokenCmd() *cobra.Command {
	var req ctlapi.JoinTokenRequest
	cmd := &cobra.Command{
		Use:   "join-token [--ttl 1h] [--single-use]",
		Short: "Print a token another machine joins with (a secret: it holds the cluster key)",
		Long: `Print a token another machine joins with. The token carries the cluster
key and a join grant recorded in the facts: the leader admits a machine
it has never seen only while the grant is valid (--ttl, one hour by
default), and only once with --single-use. Keep it secret.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := c.client.JoinToken(cmd.Context(), req)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(tok)
			}
			fmt.Fprintln(c.out, tok.Token)
			use := "any number of machines"
			if tok.SingleUse {
				use = "one machine"
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "keep this token secret: it carries the cluster key. Token %s admits %s until %s.\n",
				tok.ID, use, tok.ExpiresAt.Local().Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().DurationVar(&req.TTL, "ttl", time.Hour, "how long the token admits new machines")
	cmd.Flags().BoolVar(&req.SingleUse, "single-use", false, "admit one machine only")
	return c.addJSON(cmd)
}

// rotateKeyCmd replaces the cluster's gossip key everywhere.
func (c *cli) rotateKeyCmd() *cobra.Command {
	return c.addJSON(&cobra.Command{
		Use:   "rotate-key",
		Short: "Replace the cluster's gossip key on every machine, with no gap in membership",
		Long: `Replace the cluster's gossip key on every machine: the new key is
installed beside the old everywhere, then every machine encrypts with it,
then the old key is retired. Each step waits until every live machine
has confirmed the one before; a machine that is down takes the new key
from the facts when it returns. Join tokens made before carry the old
key and no longer work.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := c.client.RotateKey(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(r)
			}
			fmt.Fprintf(c.out, "gossip key rotated: %s -> %s (keyring generation %d)\n", r.OldKey, r.NewKey, r.Generation)
			fmt.Fprintf(c.out, "confirmed by: %s\n", strings.Join(r.Confirmed, ", "))
			if len(r.NotAlive) > 0 {
				fmt.Fprintf(c.out, "not alive now, they take the new key from the facts when back: %s\n", strings.Join(r.NotAlive, ", "))
			}
			return nil
		},
	})
}

// probeCmd measures the fact store as it runs: no-op entries committed
// through Raft from this machine, timed one by one.
func (c *cli) probeCmd() *cobra.Command {
	var req ctlapi.ProbeRequest
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "probe",
		Short: "Commit no-op entries through the fact store and show commit latency and rate",
		Long: `Commit no-op entries through the fact store from this machine and time
each one: proposal here, forwarding to the leader, replication over the
mesh, applied here. Entries change no fact; they do grow the Raft log
until its next snapshot. Exits non-zero when any entry failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req.Timeout = ctlapi.Duration(timeout)
			r, err := c.client.Probe(cmd.Context(), req)
			if err != nil {
				return err
			}
			if c.json {
				if err := c.printJSON(r); err != nil {
					return err
				}
			} else {
				tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
				fmt.Fprintf(tw, "proposed on\t%s (leader %s)\n", r.Machine, dash(r.Leader))
				fmt.Fprintf(tw, "entries\t%d committed, %d failed, %d proposers, %v\n", r.Committed, r.Failed, r.Proposers, time.Duration(r.Elapsed).Round(time.Millisecond))
				fmt.Fprintf(tw, "rate\t%.0f entries/s\n", r.PerSecond)
				fmt.Fprintf(tw, "latency\tp50 %v  p90 %v  p99 %v  max %v\n", roundDur(r.P50), roundDur(r.P90), roundDur(r.P99), roundDur(r.Max))
				if err := tw.Flush(); err != nil {
					return err
				}
			}
			if r.Failed > 0 {
				return fmt.Errorf("%d of %d entries failed; first: %s", r.Failed, r.Failed+r.Committed, r.FirstError)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&req.Proposers, "proposers", 1, "concurrent proposers")
	cmd.Flags().IntVar(&req.Count, "count", 100, "entries to commit in all")
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "for one entry")
	return c.addJSON(cmd)
}

func roundDur(d ctlapi.Duration) time.Duration { return time.Duration(d).Round(10 * time.Microsecond) }

func (c *cli) printStatus(st ctlapi.ClusterStatus) error {
	if !st.Initialized {
		fmt.Fprintf(c.out, "machine %s is in no cluster yet\n", st.MachineName)
		return nil
	}
	fmt.Fprintf(c.out, "machine:       %s (%s)\n", st.MachineName, st.Role)
	fmt.Fprintf(c.out, "leader:        %s %s\n", dash(st.LeaderName), st.LeaderAddr)
	if st.Follows != "" {
		fmt.Fprintf(c.out, "follows:       %s (the facts, from this Raft server)\n", st.Follows)
	}
	fmt.Fprintf(c.out, "term:          %d\n", st.Term)
	fmt.Fprintf(c.out, "commit index:  %d\n", st.CommitIndex)
	fmt.Fprintf(c.out, "applied index: %d\n", st.AppliedIndex)
	fmt.Fprintf(c.out, "gossip keys:   %s\n\n", strings.Join(st.GossipKeys, " "))
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

// joinCmd joins the cluster a token names. The token carries the cluster
// key, so it is read from a file or from standard input, never taken as
// an argument: every user on the machine can read a process's argv.
func (c *cli) joinCmd() *cobra.Command {
	var tokenFile string
	cmd := &cobra.Command{
		Use:   "join [--token-file FILE]",
		Short: "Join the cluster a token names (the token on stdin, or in --token-file)",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return errors.New("the join token carries the cluster key: give it on standard input or with --token-file, never as an argument (every user can read a process's arguments)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := readToken(cmd.InOrStdin(), tokenFile)
			if err != nil {
				return err
			}
			st, err := c.client.Join(cmd.Context(), ctlapi.JoinRequest{Token: tok})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "joined; leader is %s, this machine is %s\n", dash(st.LeaderName), st.Role)
			return nil
		},
	}
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "read the join token from this file (\"-\" or unset: standard input)")
	return cmd
}

// maxTokenBytes bounds what is read as a join token.
const maxTokenBytes = 64 << 10

// readToken reads a join token from file, or from in when file is "" or
// "-": the first line, trimmed.
func readToken(in io.Reader, file string) (string, error) {
	src, name := in, "standard input"
	if file != "" && file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return "", fmt.Errorf("reading the join token: %w", err)
		}
		defer f.Close()
		src, name = f, file
	}
	b, err := io.ReadAll(io.LimitReader(src, maxTokenBytes+1))
	if err != nil {
		return "", fmt.Errorf("reading the join token from %s: %w", name, err)
	}
	if len(b) > maxTokenBytes {
		return "", fmt.Errorf("the join token in %s is over %d KiB: not a token", name, maxTokenBytes>>10)
	}
	tok, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	if tok = strings.TrimSpace(tok); tok == "" {
		return "", fmt.Errorf("no join token in %s (run `droverctl cluster join-token` on a member)", name)
	}
	return tok, nil
}
