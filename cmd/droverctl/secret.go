package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/spf13/cobra"
)

// maxSecretInput bounds what is read as a secret's value (the fact store
// refuses more than 64 KiB).
const maxSecretInput = 64 << 10

func (c *cli) secretCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "secret", Short: "Secrets: sealed in the facts, files in the containers that name them"}
	var file string
	var restart bool
	set := c.addJSON(&cobra.Command{
		Use:   "set NAMESPACE/NAME [--file FILE] [--restart]",
		Short: "Set a secret's value from standard input or a file (as is: a trailing newline is kept)",
		Long: `Set a secret's value. The value is read from standard input, or from
--file; never give it as an argument (every user can read a process's
arguments). It is sealed before it reaches the fact store, and arrives in
the containers of the services that name it as a file on a tmpfs. Running
containers keep the value they started with; --restart restarts the
services using it now, one at a time.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			value, err := readSecret(cmd.InOrStdin(), file)
			if err != nil {
				return err
			}
			info, err := c.client.SetSecret(cmd.Context(), ctlapi.SecretRequest{Secret: args[0], Value: value, Restart: restart})
			if c.json && err == nil {
				return c.printJSON(info)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "secret %s set: version %d, %d bytes\n", info.Secret, info.Version, info.Size)
			switch {
			case len(info.Restarted) > 0:
				fmt.Fprintf(c.out, "restarted: %s\n", strings.Join(info.Restarted, ", "))
			case len(info.UsedBy) > 0:
				fmt.Fprintf(c.out, "used by %s, which read the new value when restarted (droverctl service restart, or --restart)\n", strings.Join(info.UsedBy, ", "))
			}
			return nil
		},
	})
	set.Flags().StringVar(&file, "file", "", "read the value from this file (\"-\" or unset: standard input)")
	set.Flags().BoolVar(&restart, "restart", false, "restart the services using it, so they read the new value")
	cmd.AddCommand(set)
	cmd.AddCommand(c.addJSON(&cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List secrets: version, size, the services using them (never values)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := c.client.Secrets(cmd.Context())
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(list)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SECRET\tVERSION\tBYTES\tUPDATED\tUSED-BY")
			for _, s := range list {
				fmt.Fprintf(tw, "%s\t%d\t%d\t%s ago\t%s\n", s.Secret, s.Version, s.Size, time.Since(s.UpdatedAt).Round(time.Second), dash(strings.Join(s.UsedBy, ",")))
			}
			return tw.Flush()
		},
	}))
	cmd.AddCommand(&cobra.Command{
		Use: "rm NAMESPACE/NAME", Short: "Forget a secret no service uses", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := c.client.RemoveSecret(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "secret %s removed\n", args[0])
			return nil
		},
	})
	return cmd
}

// readSecret reads a secret's value from file, or from in when file is
// "" or "-", as is.
func readSecret(in io.Reader, file string) ([]byte, error) {
	src, name := in, "standard input"
	if file != "" && file != "-" {
		f, err := os.Open(file)
		if err != nil {
			return nil, fmt.Errorf("reading the secret: %w", err)
		}
		defer f.Close()
		src, name = f, file
	}
	b, err := io.ReadAll(io.LimitReader(src, maxSecretInput+1))
	if err != nil {
		return nil, fmt.Errorf("reading the secret from %s: %w", name, err)
	}
	if len(b) > maxSecretInput {
		return nil, fmt.Errorf("the secret in %s is over the limit of %d KiB", name, maxSecretInput>>10)
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("no value in %s: a secret cannot be empty", name)
	}
	return b, nil
}
