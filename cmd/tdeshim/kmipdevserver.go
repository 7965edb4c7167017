package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/kmipdev"
)

func kmipDevServerCommand() *cli.Command {
	return &cli.Command{
		Name:  "kmip-dev-server",
		Usage: "run a KMIP server for development and tests (NOT FOR PRODUCTION)",
		Description: `A small KMIP 1.4 server with mutual TLS (certificates generated in --dir on
first start) and a JSON file store, for trying tdeshim without a KMS. Keys
are kept UNPROTECTED in --dir/store.json. Never use it for real data.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Value: "/var/lib/tdeshim-kmip-dev", Usage: "certificates and key store"},
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:5696", Usage: "address (loopback)"},
		},
		Action: func(c *cli.Context) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			s, err := kmipdev.Start(c.String("dir"), c.String("listen"), slog.Default())
			if err != nil {
				return err
			}
			fmt.Fprintln(os.Stderr, "WARNING:", kmipdev.Warning)
			fmt.Printf("KMIP dev server on %s\nuse: --key-provider kmip --kmip-endpoint %s --kmip-ca %s --kmip-cert %s --kmip-key %s --principal-key NAME --create-principal-key\n",
				s.Addr, s.Addr, s.Certs.CA, s.Certs.ClientCert, s.Certs.ClientKey)
			<-ctx.Done()
			return s.Close()
		},
	}
}
