package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/service"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

func keyCommand() *cli.Command {
	vol := &cli.StringFlag{Name: "volume", Required: true, Usage: "backing file or block device", EnvVars: []string{"TDESHIM_VOLUME"}}
	return &cli.Command{
		Name:  "key",
		Usage: "principal keys (info, verify, rotate-principal) and data keys (rotate, shred)",
		Subcommands: withLogging(append([]*cli.Command{
			&cli.Command{
				Name:  "info",
				Usage: "show the principal key(s), where they live, their KMS state and the slots they wrap",
				Flags: append([]cli.Flag{vol, &cli.BoolFlag{Name: "json", Usage: "machine-readable output"}}, kmipConnFlags()...),
				Action: func(c *cli.Context) error {
					return keyInfo(c, false)
				},
			},
			&cli.Command{
				Name:  "verify",
				Usage: "check the KMS is reachable, each principal key is active, and every key slot unwraps",
				Description: `Unwraps every data key (in memory, wiped after) without serving anything.
Works while serve runs. Exit status 0 only if every slot unwraps.`,
				Flags: append([]cli.Flag{vol, &cli.BoolFlag{Name: "json", Usage: "machine-readable output"}}, kmipConnFlags()...),
				Action: func(c *cli.Context) error {
					return keyInfo(c, true)
				},
			},
			&cli.Command{
				Name:  "rotate-principal",
				Usage: "rewrap every data key under a new principal key (online if serve runs)",
				Description: `Data keys are not changed, only rewrapped: no block is rewritten.
Crash-safe: the header lists the old and the new key until every slot is
rewrapped, so an interrupted rotation leaves the volume openable with either;
run it again to finish. Afterwards the old key can be revoked or destroyed in
the KMS.

Without --key-provider, the new key is in the same place as the current one
(same KMS endpoints and credentials), named --principal-key. To migrate a
volume from the file provider to KMIP, pass --key-provider kmip and the KMIP
flags.`,
				Flags:  append([]cli.Flag{vol}, providerFlags()...),
				Action: rotatePrincipal,
			},
			&cli.Command{
				Name:  "set-principal",
				Usage: "give one database its own principal key (a tenant's KMS key)",
				Description: `Every data key of the database (by OID: SELECT oid FROM pg_database) is
rewrapped under the named principal key, and its new relations use it too.
Revoking that key in the KMS then makes that database unreadable — its keys
are wiped from serve's memory and its blocks fail I/O — while every other
database, the WAL and the filesystem keep working. Crash-safe like
rotate-principal: run it again if interrupted.

   tdeshim key set-principal --volume /var/lib/tdeshim/pg.vol \
       --database 16384 --principal-key tenant-a --create-principal-key`,
				Flags:  append([]cli.Flag{vol, &cli.UintFlag{Name: "database", Required: true, Usage: "database OID"}}, providerFlags()...),
				Action: setPrincipal,
			},
		}, append(dataKeyCommands(vol), auditCommand(vol))...)...),
	}
}

type slotReport struct {
	Principal uint16 `json:"principal"`
	Slots     int    `json:"slots"`
	Unwrapped int    `json:"unwrapped"`
	State     string `json:"state"`
	Error     string `json:"error,omitempty"`
	Fix       string `json:"fix,omitempty"`
	Config    keys.Config
}

func keyInfo(c *cli.Context, verify bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	path := c.String("volume")
	st, err := store.OpenFileNoLock(path)
	if err != nil {
		return err
	}
	defer st.Close()
	s, err := volume.Inspect(st)
	if err != nil {
		return explain(err)
	}
	pt, err := keys.ParsePrincipals(s.Header.ProviderConfig)
	if err != nil {
		return err
	}
	bySlot := map[uint16][]uint32{}
	for i, sl := range s.Slots {
		if sl.State == layout.SlotActive {
			bySlot[sl.Principal] = append(bySlot[sl.Principal], uint32(i))
		}
	}
	var nums []int
	for n := range pt.Keys {
		nums = append(nums, int(n))
	}
	sort.Ints(nums)
	failed := false
	var reports []slotReport
	for _, ni := range nums {
		n := uint16(ni)
		cfg := pt.Keys[n]
		r := slotReport{Principal: n, Slots: len(bySlot[n]), Config: cfg, State: "unknown"}
		var prov keys.Provider
		if n == pt.Current {
			prov, err = overrideProvider(ctx, c, path)
		}
		if prov == nil && err == nil {
			prov, err = keys.Open(ctx, cfg)
		}
		if err != nil {
			r.Error, r.Fix = err.Error(), fixFor(err)
			failed = true
			reports = append(reports, r)
			continue
		}
		if err := prov.Check(ctx); err != nil {
			r.State, r.Error, r.Fix = "not usable", err.Error(), fixFor(err)
			failed = true
		} else {
			r.State = "active"
		}
		if verify && r.Error == "" {
			for _, i := range bySlot[n] {
				sl := s.Slots[i]
				k, err := prov.Unwrap(ctx, keys.Wrapped{Nonce: sl.Nonce, Ciphertext: sl.Ciphertext, Tag: sl.Tag}, layout.WrapAAD(s.Header.UUID, i))
				if err != nil {
					r.Error, r.Fix = fmt.Sprintf("slot %d: %v", i, err), fixFor(err)
					failed = true
					break
				}
				k.Wipe()
				r.Unwrapped++
			}
		}
		prov.Close()
		reports = append(reports, r)
	}
	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.Encode(map[string]any{"volume": path, "current": pt.Current, "principals": reports})
	} else {
		for _, r := range reports {
			cur := ""
			if r.Principal == pt.Current {
				cur = " (current)"
			}
			fmt.Printf("principal key %d%s\n", r.Principal, cur)
			fmt.Printf("  provider   %s\n", r.Config.Provider)
			switch r.Config.Provider {
			case "file":
				fmt.Printf("  key file   %s (DEVELOPMENT ONLY)\n", r.Config.KeyFile)
			case "kmip":
				k := keys.KMIPSettingsFrom(r.Config)
				fmt.Printf("  name       %s (id %s)\n  endpoints  %v\n  wrap       %s\n", k.Principal, k.KeyID, k.Endpoints, k.Wrap)
			}
			fmt.Printf("  state      %s\n  slots      %d", r.State, r.Slots)
			if verify {
				fmt.Printf(" (%d unwrapped)", r.Unwrapped)
			}
			fmt.Println()
			if r.Error != "" {
				fmt.Printf("  PROBLEM    %s\n  fix        %s\n", r.Error, r.Fix)
			}
		}
	}
	if failed {
		return errors.New("key check failed (see above)")
	}
	if verify && !c.Bool("json") {
		fmt.Println("all key slots unwrap: the volume opens with the keys available now")
	}
	return nil
}

func fixFor(err error) string {
	switch {
	case errors.Is(err, keys.ErrKMSUnreachable):
		return "check the endpoints (--kmip-endpoint), the network path, and that the KMS runs"
	case errors.Is(err, keys.ErrTLSServer):
		return "point --kmip-ca at the CA that signed the KMS certificate, and use the name in it"
	case errors.Is(err, keys.ErrTLSClient), errors.Is(err, keys.ErrClientCertExpired):
		return "issue a client certificate the KMS trusts (--kmip-cert/--kmip-key)"
	case errors.Is(err, keys.ErrPrincipalNotFound):
		return "the KMS has no such key: restore it, or the volume is unreadable"
	case errors.Is(err, keys.ErrPrincipalInactive):
		return "activate the key in the KMS (if it was revoked by mistake) or restore it; then restart serve"
	case errors.Is(err, keys.ErrWrongKey):
		return "this is not the key that wrapped the volume's keys; find the right one"
	case errors.Is(err, keys.ErrKMIPVersion):
		return "upgrade the KMS to KMIP 1.4 or later"
	}
	return "see the error"
}

func rotatePrincipal(c *cli.Context) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	path := c.String("volume")
	pt, err := readPrincipals(path)
	if err != nil {
		return err
	}
	next, create, err := newPrincipalConfig(ctx, c, pt, "rotate-principal")
	if err != nil {
		return err
	}
	return onVolume(ctx, path, func(sock string) error {
		fmt.Fprintf(os.Stderr, "volume is served; rotating online through %s\n", sock)
		if _, err := service.Ask(sock, service.ControlRequest{Op: "rotate-principal", Principal: next, Create: create}, 30*time.Minute); err != nil {
			return fmt.Errorf("online rotation: %w", err)
		}
		fmt.Println("rotated: every data key is now wrapped by", describe(next))
		return nil
	}, func(v *volume.Volume) error {
		p, err := service.OpenProvider(ctx, next, create)
		if err != nil {
			return err
		}
		err = v.RotatePrincipal(ctx, p, func(done, total uint64) {
			fmt.Fprintf(os.Stderr, "\rrewrapping key slots: %d/%d", done, total)
			if done == total {
				fmt.Fprintln(os.Stderr)
			}
		})
		if err == nil {
			fmt.Println("rotated: every data key is now wrapped by", describe(next))
		}
		return err
	})
}

// onVolume acts on a volume: through serve's control socket when serve
// holds it (online), else on the volume opened here (offline), closing it
// after and keeping the first error.
func onVolume(ctx context.Context, path string, online func(sock string) error, offline func(v *volume.Volume) error) error {
	f, err := store.OpenFile(path, false)
	if errors.Is(err, store.ErrLocked) {
		h, err := readHeader(path)
		if err != nil {
			return err
		}
		return online(service.ControlPath("", h.UUID))
	}
	if err != nil {
		return err
	}
	defer f.Close()
	v, err := volume.Open(ctx, f, volume.Options{})
	if err != nil {
		return explain(err)
	}
	err = offline(v)
	if cerr := v.Close(); err == nil {
		err = cerr
	}
	return err
}

func describe(c keys.Config) string {
	if c.Provider == "kmip" {
		return fmt.Sprintf("KMIP key %q", c.Principal)
	}
	return fmt.Sprintf("%s key %s", c.Provider, c.KeyFile)
}

func readHeader(path string) (*layout.Header, error) {
	st, err := store.OpenFileNoLock(path)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	return volume.ReadHeader(st)
}

// newPrincipalConfig works out the settings of a new principal key from
// the flags: with --key-provider, a new provider; else the same KMS as the
// current key, named --principal-key (or a new --key-file). create says
// whether the key must still be created in the KMS when it is opened.
func newPrincipalConfig(ctx context.Context, c *cli.Context, pt keys.Principals, cmd string) (keys.Config, bool, error) {
	var next keys.Config
	create := c.Bool("create-principal-key")
	if c.IsSet("key-provider") {
		p, err := newProvider(ctx, c, true)
		if err != nil {
			return keys.Config{}, false, err
		}
		next = p.Config()
		p.Close()
	} else {
		cur := pt.CurrentConfig()
		switch cur.Provider {
		case "kmip":
			s := kmipSettingsFromFlags(c, keys.KMIPSettingsFrom(cur))
			if c.String("principal-key") == "" {
				return keys.Config{}, false, errors.New(cmd + ": name the new key (--principal-key NAME)")
			}
			s.Principal, s.KeyID = c.String("principal-key"), ""
			if c.IsSet("wrap") {
				s.Wrap = c.String("wrap")
			}
			p, err := keys.OpenKMIP(ctx, s, create)
			if err != nil {
				return keys.Config{}, false, err
			}
			next = p.Config()
			p.Close()
			create = false
		case "file":
			if c.String("key-file") == "" {
				return keys.Config{}, false, errors.New(cmd + ": give the new key file (--key-file), or --key-provider kmip")
			}
			p, err := newProvider(ctx, c, true)
			if err != nil {
				return keys.Config{}, false, err
			}
			next = p.Config()
			p.Close()
		}
	}
	return next, create, nil
}

func setPrincipal(c *cli.Context) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	path := c.String("volume")
	db := uint32(c.Uint("database"))
	pt, err := readPrincipals(path)
	if err != nil {
		return err
	}
	next, create, err := newPrincipalConfig(ctx, c, pt, "set-principal")
	if err != nil {
		return err
	}
	return onVolume(ctx, path, func(sock string) error {
		fmt.Fprintf(os.Stderr, "volume is served; setting the principal key online through %s\n", sock)
		rep, err := service.Ask(sock, service.ControlRequest{Op: "set-principal", Database: db, Principal: next, Create: create}, 30*time.Minute)
		if err != nil {
			return fmt.Errorf("set-principal: %w", err)
		}
		fmt.Printf("database %d: %d data keys now wrapped by %s\n", db, rep.Rewrapped, describe(next))
		return nil
	}, func(v *volume.Volume) error {
		p, err := service.OpenProvider(ctx, next, create)
		if err != nil {
			return err
		}
		n, err := v.SetDatabasePrincipal(ctx, db, p)
		if err == nil {
			fmt.Printf("database %d: %d data keys now wrapped by %s\n", db, n, describe(next))
		}
		return err
	})
}
