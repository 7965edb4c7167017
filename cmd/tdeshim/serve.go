package main

import (
	"context"
	"log/slog"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/service"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:      "serve",
		Usage:     "serve a volume over NBD",
		ArgsUsage: " ",
		Description: `Opens the volume (replaying its journal after a crash), unwraps its keys
with the provider recorded at init, and serves it over NBD until SIGTERM or
SIGINT, which drain in-flight requests, flush, and mark the volume clean.

Clients: the kernel (tdeshim attach, or nbd-client), nbdfuse, qemu, nbdcopy.
FLUSH covers writes from every connection, so multi-conn is advertised.

Listeners (repeatable):
   unix:/run/tdeshim/pg.sock   mode 0600, the default choice
   tcp:127.0.0.1:10809         loopback only unless --allow-remote-plaintext

Exit status 0 after a clean shutdown.`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "volume", Required: true, Usage: "backing file or block device", EnvVars: []string{"TDESHIM_VOLUME"}},
			&cli.StringSliceFlag{Name: "listen", Required: true, Usage: "unix:PATH or tcp:HOST:PORT", EnvVars: []string{"TDESHIM_LISTEN"}},
			&cli.BoolFlag{Name: "read-only", Usage: "refuse writes (EPERM)"},
			&cli.BoolFlag{Name: "allow-remote-plaintext", Usage: "allow TCP on non-loopback addresses: blocks cross the network UNENCRYPTED"},
		}, providerOverrideFlags()...),
		Action: func(c *cli.Context) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			var prov keys.Provider
			if c.IsSet("key-file") {
				p, err := keys.OpenFileProvider(c.String("key-file"))
				if err != nil {
					return err
				}
				prov = p
			}
			return service.Run(ctx, service.Config{
				Volume:               c.String("volume"),
				Listen:               c.StringSlice("listen"),
				ReadOnly:             c.Bool("read-only"),
				AllowRemotePlaintext: c.Bool("allow-remote-plaintext"),
				Provider:             prov,
				Logger:               slog.Default(),
				Ready: func([]string) {
					if err := service.NotifySystemd("READY=1"); err != nil {
						slog.Warn("sd_notify failed", "err", err)
					}
				},
			})
		},
	}
}

// providerOverrideFlags let an operator (or a systemd credential) point at
// a key somewhere other than what the header recorded.
func providerOverrideFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "key-file", Usage: "file provider: override the key file recorded at init", EnvVars: []string{"TDESHIM_KEY_FILE"}},
	}
}
