package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/service"
	"github.com/tdeshim/tdeshim/volume"
)

// Data-key commands: rotate (fresh keys, blocks re-encrypted by the
// rekeyer) and shred (destroy a dropped relation's key). Both act through
// the control socket when serve holds the volume, else on the volume
// directly, and wait with a progress line until the old keys are
// destroyed (unless --no-wait).

func dataKeyCommands(vol cli.Flag) []*cli.Command {
	target := []cli.Flag{
		&cli.StringFlag{Name: "relation", Usage: "one relfilenode: DB/RELFILENODE or TABLESPACE/DB/RELFILENODE (OIDs, as in base/DB/RELFILENODE)"},
		&cli.UintFlag{Name: "database", Usage: "every relation key of this database OID"},
		&cli.BoolFlag{Name: "wal", Usage: "the WAL key"},
		&cli.BoolFlag{Name: "volume-key", Usage: "the volume key (filesystem metadata and non-relation files)"},
		&cli.BoolFlag{Name: "all", Usage: "every data key"},
	}
	wait := &cli.BoolFlag{Name: "no-wait", Usage: "return once the new keys exist; the rekeyer finishes in the background"}
	return []*cli.Command{
		{
			Name:  "rotate",
			Usage: "re-encrypt relations, the WAL or everything under fresh data keys, online",
			Description: `Each selected key gets a fresh replacement; the old one is marked retiring
(durably), the rekeyer re-encrypts its blocks under the new key while
PostgreSQL runs — no table rewrite, no lock — and destroys the old key once
no block uses it. Interrupted (crash, restart), it resumes by itself: the
retiring state is on disk. Throttled by serve's --rekey-rate.

Examples:
   tdeshim key rotate --volume /var/lib/tdeshim/pg.vol --relation 16384/16390
   tdeshim key rotate --volume /var/lib/tdeshim/pg.vol --database 16384
   tdeshim key rotate --volume /var/lib/tdeshim/pg.vol --all`,
			Flags:  append(append([]cli.Flag{vol}, target...), wait),
			Action: func(c *cli.Context) error { return dataKeyAction(c, "rotate-keys") },
		},
		{
			Name:  "shred",
			Usage: "destroy a dropped relation's data key now (crypto-shredding)",
			Description: `serve does this by itself once a relfilenode's files have been gone for
--shred-grace; shred skips the wait. Blocks the filesystem has reused move to
their new owners' keys first; then the key is overwritten in the key table,
and nothing on this volume can decrypt that relation's old blocks: there is
no undo. Copies of the backing store made earlier (snapshots, backups, old
disks) hold their own wrapped copy of the key: to make them unreadable too,
rotate the principal key (key rotate-principal) and destroy the old one in
the KMS. Refused while the relation still has files, unless --force.`,
			Flags: []cli.Flag{vol,
				&cli.StringFlag{Name: "relation", Required: true, Usage: "DB/RELFILENODE or TABLESPACE/DB/RELFILENODE"},
				&cli.BoolFlag{Name: "force", Usage: "shred even though the relation's files exist (its data moves to a new key)"},
				wait},
			Action: func(c *cli.Context) error { return dataKeyAction(c, "shred") },
		},
	}
}

// parseRelation reads DB/REL (tablespace pg_default, or pg_global for
// database 0) or SPC/DB/REL.
func parseRelation(s string) (layout.RelKey, error) {
	parts := strings.Split(s, "/")
	nums := make([]uint32, len(parts))
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return layout.RelKey{}, fmt.Errorf("relation %q: want DB/RELFILENODE or TABLESPACE/DB/RELFILENODE (decimal OIDs)", s)
		}
		nums[i] = uint32(n)
	}
	switch len(nums) {
	case 2:
		spc := uint32(layout.DefaultTablespace)
		if nums[0] == 0 {
			spc = layout.GlobalTablespace
		}
		return layout.RelKey{Tablespace: spc, Database: nums[0], RelNode: nums[1]}, nil
	case 3:
		return layout.RelKey{Tablespace: nums[0], Database: nums[1], RelNode: nums[2]}, nil
	}
	return layout.RelKey{}, fmt.Errorf("relation %q: want DB/RELFILENODE or TABLESPACE/DB/RELFILENODE", s)
}

func keyTarget(c *cli.Context) (*service.KeyTarget, error) {
	t := &service.KeyTarget{WAL: c.Bool("wal"), VolumeKey: c.Bool("volume-key"), All: c.Bool("all"), Force: c.Bool("force")}
	n := 0
	for _, f := range []string{"relation", "database", "wal", "volume-key", "all"} {
		if c.IsSet(f) {
			n++
		}
	}
	if n != 1 {
		return nil, errors.New("name exactly one of --relation, --database, --wal, --volume-key, --all")
	}
	if c.IsSet("relation") {
		r, err := parseRelation(c.String("relation"))
		if err != nil {
			return nil, err
		}
		t.Relation = &r
	}
	if c.IsSet("database") {
		d := uint32(c.Uint("database"))
		t.Database = &d
	}
	return t, nil
}

func dataKeyAction(c *cli.Context, op string) error {
	t, err := keyTarget(c)
	if err != nil {
		return err
	}
	path := c.String("volume")
	ctx, cancel := context.WithTimeout(context.Background(), 24*time.Hour)
	defer cancel()
	return onVolume(ctx, path, func(sock string) error {
		rep, err := service.Ask(sock, service.ControlRequest{Op: op, Target: t}, 10*time.Minute)
		if err != nil {
			return fmt.Errorf("%s (online, through %s): %w", op, sock, err)
		}
		if len(rep.Retired) == 0 {
			return errors.New("no active key matches; see tdeshim status --relations")
		}
		fmt.Fprintf(os.Stderr, "%d key(s) retiring: %v\n", len(rep.Retired), rep.Retired)
		if c.Bool("no-wait") {
			return nil
		}
		return waitRetired(ctx, sock, rep.Retired)
	}, func(v *volume.Volume) error {
		var retired []uint32
		var err error
		if op == "shred" {
			s := v.RelationSlot(*t.Relation)
			if s == 0 {
				return fmt.Errorf("relation %s has no active key", c.String("relation"))
			}
			err, retired = v.Retire(ctx, s, false), []uint32{s}
		} else {
			retired, err = v.RotateKeys(ctx, func(_ uint32, sl layout.Slot) bool { return t.Select(sl) })
		}
		if err == nil && len(retired) == 0 {
			err = errors.New("no active key matches; see tdeshim status --relations")
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "%d key(s) retiring: %v (offline: the volume is not served)\n", len(retired), retired)
		return settleWithProgress(ctx, v)
	})
}

// settleWithProgress runs the rekeyer to completion on an unserved volume.
func settleWithProgress(ctx context.Context, v *volume.Volume) error {
	total := v.RekeyStatsSnapshot().RetiringBlocks
	done := make(chan error, 1)
	go func() { done <- v.Settle(ctx) }()
	t := time.NewTicker(300 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case err := <-done:
			progressLine(total, 0, 0)
			fmt.Fprintln(os.Stderr)
			return err
		case <-t.C:
			s := v.RekeyStatsSnapshot()
			progressLine(total, s.RetiringBlocks, s.RetiringSlots)
		}
	}
}

func progressLine(total, left int64, keys int) {
	pct := 100.0
	if total > 0 {
		pct = float64(total-left) * 100 / float64(total)
	}
	const width = 30
	n := int(pct / 100 * width)
	fmt.Fprintf(os.Stderr, "\r[%s%s] %5.1f%%  %d blocks left, %d key(s) retiring ", strings.Repeat("#", n), strings.Repeat(".", width-n), pct, left, keys)
}

// waitRetired polls serve until the retired slots are destroyed.
func waitRetired(ctx context.Context, sock string, slots []uint32) error {
	var total int64 = -1
	for {
		rep, err := service.Ask(sock, service.ControlRequest{Op: "state", Relations: true}, time.Minute)
		if err != nil {
			return err
		}
		left, pending := int64(0), 0
		for _, r := range rep.Keys.Retiring {
			for _, s := range slots {
				if r.KeySlot == s {
					left += r.Blocks
					pending++
				}
			}
		}
		if total < 0 {
			total = left
		}
		progressLine(total, left, pending)
		if pending == 0 {
			fmt.Fprintln(os.Stderr, "\nold keys destroyed; every block is under its new key")
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}
