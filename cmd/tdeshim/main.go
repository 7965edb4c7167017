// Command tdeshim is transparent data encryption for stock PostgreSQL,
// below the filesystem: an NBD server that encrypts every block of the
// data volume with keys wrapped by a principal key you control.
package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
)

var version = "0.1.0-dev"

func main() {
	app := &cli.App{
		Name:    "tdeshim",
		Usage:   "encrypt a PostgreSQL data volume below the filesystem",
		Version: version,
		Description: `tdeshim serves an encrypted volume as an NBD block device. PostgreSQL runs
unchanged on ext4 on that device; every block that reaches the backing file
or disk is AES-256-XTS ciphertext, and the data keys are wrapped by a
principal key held by a key provider (a KMIP key manager in production).

Typical life of a volume (principal key in a KMIP server):
   tdeshim init   --volume /srv/pg.vol --size 20G --key-provider kmip \
                  --kmip-endpoint kms:5696 --kmip-ca ca.pem --kmip-cert c.pem --kmip-key c.key \
                  --principal-key pg-main --create-principal-key
   tdeshim up     --volume /srv/pg.vol --mount /var/lib/postgresql/15/main --owner postgres
   tdeshim status --volume /srv/pg.vol
   tdeshim key rotate-principal --volume /srv/pg.vol --principal-key pg-next --create-principal-key
   tdeshim down   --mount /var/lib/postgresql/15/main

Try everything on one machine, as root: tdeshim demo.
Without a KMS: --key-provider file --key-file PATH (development only).

What crosses the NBD socket is plaintext: keep it a unix socket (mode 0600)
or loopback TCP.`,
		Commands: withLogging(initCommand(), serveCommand(), statusCommand(), attachCommand(), detachCommand(), demoCommand(), keyCommand(), kmipDevServerCommand(), upCommand(), downCommand()),
	}
	stopProfile := startProfile()
	err := app.Run(os.Args)
	stopProfile()
	if err != nil {
		msg := err.Error()
		if !strings.HasPrefix(msg, "tdeshim") {
			msg = "tdeshim: " + msg
		}
		fmt.Fprintln(os.Stderr, msg)
		os.Exit(1)
	}
}

// withLogging gives every command a --log-level flag and a slog logger on
// stderr (key material is never logged; see keys.Secret).
func withLogging(cmds ...*cli.Command) []*cli.Command {
	for _, cmd := range cmds {
		if len(cmd.Subcommands) > 0 {
			continue // the subcommands have their own
		}
		cmd.Flags = append(cmd.Flags, &cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: []string{"TDESHIM_LOG_LEVEL"}})
		cmd.Before = func(c *cli.Context) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})))
			return nil
		}
	}
	return cmds
}
