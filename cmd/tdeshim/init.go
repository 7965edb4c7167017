package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

func providerFlags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "key-provider", Value: "file", Usage: "where the principal key lives: kmip, or file (DEVELOPMENT ONLY)", EnvVars: []string{"TDESHIM_KEY_PROVIDER"}},
		&cli.StringFlag{Name: "principal-key", Usage: "kmip: name of the principal key in the KMS", EnvVars: []string{"TDESHIM_PRINCIPAL_KEY"}},
		&cli.BoolFlag{Name: "create-principal-key", Usage: "kmip: create and activate the principal key if no key has that name"},
		&cli.StringFlag{Name: "wrap", Value: "server", Usage: "kmip: server (KMS encrypts; key never leaves it) or local (KMIP Get, wrap here)"},
	}, kmipConnFlags()...)
}

// kmipConnFlags say how to reach the KMS; serve and key commands accept
// them as overrides of what the header recorded.
func kmipConnFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "key-file", Usage: "file provider: path of a 0600 file holding the 32-byte principal key (hex)", EnvVars: []string{"TDESHIM_KEY_FILE"}},
		&cli.StringSliceFlag{Name: "kmip-endpoint", Usage: "kmip: HOST:PORT of the KMS; repeat or comma-separate for failover", EnvVars: []string{"TDESHIM_KMIP_ENDPOINT"}},
		&cli.StringFlag{Name: "kmip-ca", Usage: "kmip: PEM file of the CA that signs the KMS certificate", EnvVars: []string{"TDESHIM_KMIP_CA"}},
		&cli.StringFlag{Name: "kmip-cert", Usage: "kmip: client certificate (PEM) for mutual TLS", EnvVars: []string{"TDESHIM_KMIP_CERT"}},
		&cli.StringFlag{Name: "kmip-key", Usage: "kmip: client private key (PEM)", EnvVars: []string{"TDESHIM_KMIP_KEY"}},
	}
}

func initCommand() *cli.Command {
	return &cli.Command{
		Name:      "init",
		Usage:     "create a new encrypted volume",
		ArgsUsage: " ",
		Description: `Creates a volume in a (sparse) file or on a block device: two header copies,
a key table holding the volume key wrapped by the principal key, an empty
journal and key map. The data area is not written: blocks never written read
as zeros and are never decrypted.

The provider settings (never key bytes) are recorded in the header, so serve
needs only --volume and --listen.

The file key provider is for development and the quick start only: a copy
of the key file next to a copy of the volume reads everything. If --key-file
does not exist, init creates it (mode 0600) with a random key.

Example:
   tdeshim init --volume /srv/pg.vol --size 20G --key-file /etc/tdeshim/dev.key`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "volume", Required: true, Usage: "backing file or block device", EnvVars: []string{"TDESHIM_VOLUME"}},
			&cli.StringFlag{Name: "size", Usage: "logical size, e.g. 20G (default for a block device: all of it)"},
			&cli.BoolFlag{Name: "force", Usage: "overwrite an existing volume or file (destroys its data)"},
			&cli.UintFlag{Name: "key-slots", Usage: "key-table slots (one per relation later); default by size"},
		}, providerFlags()...),
		Action: runInit,
	}
}

func runInit(c *cli.Context) error {
	ctx := context.Background()
	path := c.String("volume")
	if err := refuseOverwrite(path, c.Bool("force")); err != nil {
		return err
	}
	prov, err := newProvider(ctx, c, true)
	if err != nil {
		return err
	}
	defer prov.Close()
	if prov.Development() {
		fmt.Fprintln(os.Stderr, "WARNING:", keys.FileProviderWarning)
	}
	var size uint64
	if s := c.String("size"); s != "" {
		if size, err = parseSize(s); err != nil {
			return err
		}
	} else if size, err = deviceDefaultSize(path); err != nil {
		return err
	}
	size = size / layout.BlockSize * layout.BlockSize
	geo := layout.DefaultGeometry(size)
	if n := c.Uint("key-slots"); n > 0 {
		geo.Slots = uint32(n)
	}
	if err := geo.Validate(); err != nil {
		return err
	}
	st, err := store.CreateFile(path, geo.BackingSize())
	if err != nil {
		return fmt.Errorf("init %s: %w", path, err)
	}
	defer st.Close()
	progress := func(done, total uint64) {
		fmt.Fprintf(os.Stderr, "\rclearing metadata: %3d%%", done*100/total)
		if done == total {
			fmt.Fprintln(os.Stderr)
		}
	}
	if err := volume.Create(ctx, st, geo, prov, progress); err != nil {
		return fmt.Errorf("init %s: %w", path, err)
	}
	h, err := volume.ReadHeader(st)
	if err != nil {
		return err
	}
	fmt.Printf("created volume %s\n  uuid     %x\n  size     %s (%d bytes)\n  slots    %d\n  metadata %s before the data area\n  provider %s\n",
		path, h.UUID, humanBytes(size), size, geo.Slots, humanBytes(uint64(geo.DataOff())), prov.Config().Provider)
	fmt.Printf("next: tdeshim serve --volume %s --listen unix:/run/tdeshim/%s.sock\n", path, "volume")
	return nil
}

// refuseOverwrite protects existing volumes and files with content.
func refuseOverwrite(path string, force bool) error {
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if force {
		return nil
	}
	if st.Mode().IsRegular() && st.Size() == 0 {
		return nil
	}
	f, err := store.OpenFile(path, true)
	if err != nil {
		return fmt.Errorf("init %s: %w", path, err)
	}
	defer f.Close()
	if _, err := volume.ReadHeader(f); err == nil {
		return fmt.Errorf("init %s: already a tdeshim volume; pass --force to destroy it and start over", path)
	}
	if st.Mode().IsRegular() {
		return fmt.Errorf("init %s: file exists and is not empty; pass --force to overwrite it", path)
	}
	return fmt.Errorf("init %s: device may hold data; pass --force to overwrite it", path)
}

func deviceDefaultSize(path string) (uint64, error) {
	st, err := os.Stat(path)
	if err != nil || st.Mode()&os.ModeDevice == 0 {
		return 0, errors.New("init: --size is required for a file volume (e.g. --size 20G)")
	}
	f, err := store.OpenFile(path, true)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	total := uint64(f.Size())
	// Shrink until data plus metadata fit.
	size := total / layout.BlockSize * layout.BlockSize
	for size > 0 && uint64(layout.DefaultGeometry(size).BackingSize()) > total {
		size -= 1 << 20
	}
	if size == 0 {
		return 0, fmt.Errorf("init: %s is too small for a volume", path)
	}
	return size, nil
}

func newProvider(ctx context.Context, c *cli.Context, creating bool) (keys.Provider, error) {
	switch kind := c.String("key-provider"); kind {
	case "kmip":
		s := kmipSettingsFromFlags(c, keys.KMIPSettings{})
		s.Principal, s.Wrap = c.String("principal-key"), c.String("wrap")
		return keys.OpenKMIP(ctx, s, c.Bool("create-principal-key"))
	case "file":
		kf := c.String("key-file")
		if kf == "" {
			return nil, errors.New("--key-file is required with --key-provider file")
		}
		if _, err := os.Stat(kf); creating && errors.Is(err, os.ErrNotExist) {
			if err := keys.CreateKeyFile(kf); err != nil {
				return nil, err
			}
			fmt.Fprintf(os.Stderr, "created principal key file %s (mode 0600); back it up: without it the volume cannot be read\n", kf)
		}
		abs, err := filepath.Abs(kf)
		if err != nil {
			return nil, err
		}
		return keys.OpenFileProvider(abs)
	default:
		return keys.Open(ctx, keys.Config{Provider: kind})
	}
}

// kmipSettingsFromFlags applies the KMIP connection flags that are set to
// base (recorded settings, or empty at init). Paths become absolute,
// since serve may run from another directory.
func kmipSettingsFromFlags(c *cli.Context, base keys.KMIPSettings) keys.KMIPSettings {
	if eps := c.StringSlice("kmip-endpoint"); len(eps) > 0 {
		base.Endpoints = nil
		for _, e := range eps {
			for _, p := range strings.Split(e, ",") {
				if p = strings.TrimSpace(p); p != "" {
					base.Endpoints = append(base.Endpoints, p)
				}
			}
		}
	}
	for flag, dst := range map[string]*string{"kmip-ca": &base.CA, "kmip-cert": &base.Cert, "kmip-key": &base.Key} {
		if v := c.String(flag); v != "" {
			if abs, err := filepath.Abs(v); err == nil {
				v = abs
			}
			*dst = v
		}
	}
	return base
}
