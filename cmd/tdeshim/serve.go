package main

import (
	"context"
	"fmt"
	"log/slog"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/service"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
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

Per-relation keys (--watch MOUNT): give the path where the volume's ext4
filesystem is, or will be, mounted (it may be mounted later; serve checks the
filesystem's UUID is this volume's before trusting it). Every relfilenode then
gets its own data key, pg_wal its WAL key, everything else the volume key.
Blocks written before their file was seen take the volume key and are moved
by the rekeyer (--rekey-rate). A relfilenode whose files are gone for
--shred-grace has its key destroyed (crypto-shredding). Copies of the backing
store made earlier carry their own wrapped copy of that key: they stay
readable until their principal key is gone too (docs/OPERATIONS.md).

Exit status 0 after a clean shutdown.`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "volume", Required: true, Usage: "backing file or block device", EnvVars: []string{"TDESHIM_VOLUME"}},
			&cli.StringSliceFlag{Name: "listen", Required: true, Usage: "unix:PATH or tcp:HOST:PORT", EnvVars: []string{"TDESHIM_LISTEN"}},
			&cli.BoolFlag{Name: "read-only", Usage: "refuse writes (EPERM)"},
			&cli.BoolFlag{Name: "allow-remote-plaintext", Usage: "allow TCP on non-loopback addresses: blocks cross the network UNENCRYPTED"},
			&cli.DurationFlag{Name: "kms-check-interval", Value: time.Minute, Usage: "check the principal key in the KMS this often; a revoked or destroyed key suspends the volume (0: never)", EnvVars: []string{"TDESHIM_KMS_CHECK_INTERVAL"}},
			&cli.BoolFlag{Name: "unsafe-volatile-cache-model", Hidden: true, Usage: "power-loss tests: keep writes in memory until FLUSH"},
			&cli.StringFlag{Name: "watch", Usage: "mount point of the volume's filesystem (PGDATA inside it): per-relation and WAL keys", EnvVars: []string{"TDESHIM_WATCH"}},
			&cli.StringFlag{Name: "rekey-rate", Value: "32MiB", Usage: "rekeyer bandwidth per second (each moved block costs a journal copy and an in-place write; 0 = unlimited)", EnvVars: []string{"TDESHIM_REKEY_RATE"}},
			&cli.DurationFlag{Name: "shred-grace", Value: 10 * time.Minute, Usage: "destroy a relfilenode's key once its files are gone this long (negative: never automatically)", EnvVars: []string{"TDESHIM_SHRED_GRACE"}},
			&cli.StringFlag{Name: "dsn", Usage: "optional PostgreSQL connection (e.g. 'host=/run/postgresql user=postgres dbname=postgres'): relation names in status; a shred waits until the catalog agrees", EnvVars: []string{"TDESHIM_DSN"}},
			&cli.StringFlag{Name: "control-dir", Value: service.DefaultControlDir, Usage: "directory for the control socket (live status, online rotation)", EnvVars: []string{"TDESHIM_CONTROL_DIR"}},
		}, kmipConnFlags()...),
		Action: func(c *cli.Context) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			prov, err := overrideProvider(ctx, c, c.String("volume"))
			if err != nil {
				return err
			}
			rate := uint64(0)
			if r := c.String("rekey-rate"); r != "0" {
				if rate, err = parseSize(r); err != nil {
					return fmt.Errorf("--rekey-rate: %w", err)
				}
			}
			return service.Run(ctx, service.Config{
				Watch:                c.String("watch"),
				RekeyRate:            int64(rate),
				ShredGrace:           c.Duration("shred-grace"),
				DSN:                  c.String("dsn"),
				Volume:               c.String("volume"),
				Listen:               c.StringSlice("listen"),
				ReadOnly:             c.Bool("read-only"),
				AllowRemotePlaintext: c.Bool("allow-remote-plaintext"),
				Provider:             prov,
				KMSCheckInterval:     c.Duration("kms-check-interval"),
				ControlDir:           c.String("control-dir"),
				VolatileCacheModel:   c.Bool("unsafe-volatile-cache-model"),
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

// overrideProvider opens the current principal key with connection flags
// (or TDESHIM_* variables, e.g. from systemd credentials) overriding what
// the header recorded. It returns nil when nothing is overridden.
func overrideProvider(ctx context.Context, c *cli.Context, path string) (keys.Provider, error) {
	set := false
	for _, f := range []string{"key-file", "kmip-endpoint", "kmip-ca", "kmip-cert", "kmip-key"} {
		set = set || c.IsSet(f)
	}
	if !set {
		return nil, nil
	}
	pt, err := readPrincipals(path)
	if err != nil {
		return nil, err
	}
	cur := pt.CurrentConfig()
	switch cur.Provider {
	case "file":
		if kf := c.String("key-file"); kf != "" {
			return keys.OpenFileProvider(kf)
		}
		return nil, nil
	case "kmip":
		return keys.OpenKMIP(ctx, kmipSettingsFromFlags(c, keys.KMIPSettingsFrom(cur)), false)
	}
	return nil, fmt.Errorf("volume uses provider %q; the override flags do not apply", cur.Provider)
}

// readPrincipals reads a volume's principal table without locking it.
func readPrincipals(path string) (keys.Principals, error) {
	st, err := store.OpenFileNoLock(path)
	if err != nil {
		return keys.Principals{}, err
	}
	defer st.Close()
	h, err := volume.ReadHeader(st)
	if err != nil {
		return keys.Principals{}, explain(err)
	}
	return keys.ParsePrincipals(h.ProviderConfig)
}
