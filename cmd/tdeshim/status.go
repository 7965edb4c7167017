package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/service"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show a volume's format, keys and usage (no key needed)",
		ArgsUsage: " ",
		Description: `Reads the header, key table, key map and journal without unwrapping any key,
so it works without access to the principal key and while serve runs. While
serve runs, it also asks serve (control socket) for what only it knows: KMS
health, connections, and with --relations which blocks belong to which
relation (from its watcher), rekey lag and pending shreds.

   tdeshim status --volume /var/lib/tdeshim/pg.vol --relations
   tdeshim status --volume /var/lib/tdeshim/pg.vol --relations --json | jq '.relations[]'`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "volume", Required: true, Usage: "backing file or block device", EnvVars: []string{"TDESHIM_VOLUME"}},
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
			&cli.BoolFlag{Name: "relations", Usage: "per-relation keys: slot, blocks under its own key and under another, rekey lag, shredding"},
			&cli.BoolFlag{Name: "reset-rekey-stats", Usage: "zero serve's rekey counters and lag samples first (to measure one workload)"},
			&cli.StringFlag{Name: "control-dir", Value: service.DefaultControlDir, Usage: "where serve's control socket is", EnvVars: []string{"TDESHIM_CONTROL_DIR"}},
		},
		Action: runStatus,
	}
}

// Status is the JSON shape of `status --json`.
type Status struct {
	Volume        string                `json:"volume"`
	Format        uint32                `json:"format_version"`
	UUID          string                `json:"uuid"`
	SizeBytes     uint64                `json:"size_bytes"`
	Cipher        string                `json:"cipher"`
	InUse         bool                  `json:"in_use"`
	Clean         bool                  `json:"clean"`
	Created       time.Time             `json:"created"`
	LastOpen      *time.Time            `json:"last_open"`
	LastClean     *time.Time            `json:"last_clean_shutdown"`
	Provider      keys.Config           `json:"provider"`
	PrincipalKeys int                   `json:"principal_keys"`
	Live          *service.ControlReply `json:"live,omitempty"`
	Slots         SlotSummary           `json:"key_slots"`
	Blocks        BlockSummary          `json:"blocks"`
	Journal       JournalSummary        `json:"journal"`
	MetadataBytes int64                 `json:"metadata_bytes"`
	// With --relations: one entry per relfilenode key (a contract for
	// scripts: tablespace_oid, database_oid, relfilenode, key_slot,
	// blocks_own_key, blocks_other_key, name), and the rest of the key
	// overview.
	Relations []volume.RelationReport `json:"relations,omitempty"`
	Keys      *volume.KeyReport       `json:"keys,omitempty"`
}

type SlotSummary struct {
	Total     uint32 `json:"total"`
	Active    int    `json:"active"`
	Destroyed int    `json:"destroyed"`
	Retiring  int    `json:"retiring"`
	Volume    int    `json:"volume"`
	WAL       int    `json:"wal"`
	Relation  int    `json:"relation"`
}

type BlockSummary struct {
	Total uint64 `json:"total"`
	Used  uint64 `json:"used"`
	Free  uint64 `json:"free"`
}

type JournalSummary struct {
	Epoch          uint64 `json:"epoch"`
	PendingRecords int    `json:"pending_records"`
	UsedBlocks     uint32 `json:"used_blocks"`
	CapacityBlocks uint32 `json:"capacity_blocks"`
}

func runStatus(c *cli.Context) error {
	path := c.String("volume")
	st, err := store.OpenFile(path, true)
	inUse := false
	if errors.Is(err, store.ErrLocked) {
		inUse = true
		st, err = openUnlocked(path)
	}
	if err != nil {
		return fmt.Errorf("status %s: %w", path, err)
	}
	defer st.Close()
	s, err := volume.Inspect(st)
	if err != nil {
		return fmt.Errorf("status %s: %w", path, explain(err))
	}
	out := summarize(path, s, inUse)
	if inUse {
		// serve knows more than the disk: KMS health, suspension, owners.
		sock := service.ControlPath(c.String("control-dir"), s.Header.UUID)
		if c.Bool("reset-rekey-stats") {
			if _, err := service.Ask(sock, service.ControlRequest{Op: "reset-stats"}, time.Minute); err != nil {
				return err
			}
		}
		if rep, err := service.Ask(sock, service.ControlRequest{Op: "state", Relations: c.Bool("relations")}, time.Minute); err == nil {
			out.Live = rep
			out.Keys, rep.Keys = rep.Keys, nil
		}
	}
	if c.Bool("relations") {
		if out.Keys == nil {
			kr := volume.BuildKeyReport(s.Slots, func(b uint64) uint32 { return s.Entries[b] }, volume.CountBySlot(s.Entries), s.Header.Geometry.Blocks(), nil, s.Header.VolumeKeySlot)
			out.Keys = &kr
		}
		out.Relations, out.Keys.Relations = out.Keys.Relations, nil
		if out.Relations == nil {
			out.Relations = []volume.RelationReport{}
		}
	}
	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	printStatus(out)
	return nil
}

// openUnlocked reads a volume a running serve holds. The on-disk state may
// trail the server's memory by the commits it has not yet made.
func openUnlocked(path string) (*store.File, error) {
	return store.OpenFileNoLock(path)
}

func summarize(path string, s *volume.State, inUse bool) Status {
	h := s.Header
	g := h.Geometry
	out := Status{
		Volume: path, Format: h.Version, UUID: fmt.Sprintf("%x", h.UUID), SizeBytes: g.Size,
		Cipher: "aes-256-xts (4 KiB units, tweak = block number)", InUse: inUse,
		Clean: h.Flags&layout.FlagClean != 0, Created: time.Unix(h.Created, 0).UTC(),
		MetadataBytes: g.DataOff(),
	}
	if h.LastOpen != 0 {
		t := time.Unix(h.LastOpen, 0).UTC()
		out.LastOpen = &t
	}
	if h.LastClean != 0 {
		t := time.Unix(h.LastClean, 0).UTC()
		out.LastClean = &t
	}
	if pt, err := keys.ParsePrincipals(h.ProviderConfig); err == nil {
		out.Provider = pt.CurrentConfig()
		out.PrincipalKeys = len(pt.Keys)
	}
	out.Slots.Total = g.Slots
	for _, sl := range s.Slots {
		switch sl.State {
		case layout.SlotActive:
			out.Slots.Active++
			switch sl.Kind {
			case layout.KindVolume:
				out.Slots.Volume++
			case layout.KindWAL:
				out.Slots.WAL++
			case layout.KindRelation:
				out.Slots.Relation++
			}
		case layout.SlotDestroyed:
			out.Slots.Destroyed++
		case layout.SlotRetiring:
			out.Slots.Retiring++
		}
	}
	out.Blocks.Total = g.Blocks()
	for _, e := range s.Entries {
		if e != layout.FreeEntry {
			out.Blocks.Used++
		}
	}
	out.Blocks.Free = out.Blocks.Total - out.Blocks.Used
	out.Journal = JournalSummary{Epoch: s.Epoch, PendingRecords: s.Replayed, UsedBlocks: s.JournalUsed, CapacityBlocks: g.JournalRecordBlocks()}
	return out
}

func printStatus(s Status) {
	state := "clean (closed normally)"
	if !s.Clean {
		state = "open or crashed (journal will be replayed at next open)"
	}
	if s.InUse {
		state = "in use by a running serve (figures below are as of its last commit)"
	}
	fmt.Printf("volume      %s\n", s.Volume)
	fmt.Printf("format      tdeshim v%d, uuid %s\n", s.Format, s.UUID)
	fmt.Printf("size        %s (%d bytes), metadata %s\n", humanBytes(s.SizeBytes), s.SizeBytes, humanBytes(uint64(s.MetadataBytes)))
	fmt.Printf("cipher      %s\n", s.Cipher)
	fmt.Printf("state       %s\n", state)
	fmt.Printf("created     %s\n", s.Created.Format(time.RFC3339))
	if s.LastClean != nil {
		fmt.Printf("last clean  %s\n", s.LastClean.Format(time.RFC3339))
	} else {
		fmt.Printf("last clean  never\n")
	}
	prov := s.Provider.Provider
	if prov == "file" {
		prov += " " + s.Provider.KeyFile + " (DEVELOPMENT ONLY)"
	}
	if s.Provider.Provider == "kmip" {
		k := keys.KMIPSettingsFrom(s.Provider)
		prov = fmt.Sprintf("kmip key %q (id %s) at %v, wrap=%s", k.Principal, k.KeyID, k.Endpoints, k.Wrap)
	}
	if s.PrincipalKeys > 1 {
		prov += fmt.Sprintf(" — %d principal keys listed: a rotation did not finish; run key rotate-principal again", s.PrincipalKeys)
	}
	fmt.Printf("provider    %s\n", prov)
	if s.Live != nil {
		kms := s.Live.KMS
		if kms == "" {
			kms = "not checked"
		}
		fmt.Printf("kms         %s (checked %s)\n", kms, s.Live.KMSChecked.Format(time.RFC3339))
		if s.Live.Suspended {
			fmt.Printf("SUSPENDED   the principal key was revoked or destroyed: I/O fails, keys are wiped; restore the key and restart serve\n")
		}
		fmt.Printf("serving     %d NBD connections\n", s.Live.Connections)
		for n, why := range s.Live.SuspendedPrincipals {
			var dbs []uint32
			for db, m := range s.Live.Databases {
				if m == n {
					dbs = append(dbs, db)
				}
			}
			fmt.Printf("REVOKED     principal key %d of database(s) %v: their data keys are wiped, their blocks fail I/O (%s)\n", n, dbs, why)
		}
		if len(s.Live.Databases) > 0 {
			fmt.Printf("tenants     %d database(s) with their own principal key: %v (database OID: principal entry)\n", len(s.Live.Databases), s.Live.Databases)
		}
	}
	fmt.Printf("key slots   %d active (%d volume, %d WAL, %d relation), %d destroyed, %d total\n",
		s.Slots.Active, s.Slots.Volume, s.Slots.WAL, s.Slots.Relation, s.Slots.Destroyed, s.Slots.Total)
	pct := float64(0)
	if s.Blocks.Total > 0 {
		pct = 100 * float64(s.Blocks.Used) / float64(s.Blocks.Total)
	}
	fmt.Printf("blocks      %d used (%.1f%%), %d free, %d total\n", s.Blocks.Used, pct, s.Blocks.Free, s.Blocks.Total)
	fmt.Printf("journal     epoch %d, %d records pending (%d of %d blocks)\n",
		s.Journal.Epoch, s.Journal.PendingRecords, s.Journal.UsedBlocks, s.Journal.CapacityBlocks)
	if s.Live != nil && s.Live.Watch != nil {
		w := s.Live.Watch
		switch {
		case w.Problem != "":
			fmt.Printf("watch       %s: NOT INDEXING — %s\n", w.Mount, w.Problem)
		default:
			fmt.Printf("watch       %s: data directory %s, %d files indexed, %d scans, %d events\n", w.Mount, w.DataDir, w.Files, w.Scans, w.Events)
		}
	}
	if s.Live != nil {
		r := s.Live.Rekey
		fmt.Printf("rekeyer     %d blocks pending (oldest %.1f s), %d moved, amplification %.2f%%, lag p99 %.2f s\n",
			r.PendingBlocks, r.LagSeconds, r.MovedBlocks, 100*r.Amplification, r.LagP99Seconds)
	}
	if s.Keys != nil {
		printKeys(s)
	}
}

func printKeys(s Status) {
	k := s.Keys
	src := "from the key map only (serve --watch is not indexing: blocks of other owners are not counted)"
	if k.Watched {
		src = "ownership from serve's watcher"
	}
	fmt.Printf("\nrelation keys: %d — %s\n", len(s.Relations), src)
	if len(s.Relations) > 0 {
		fmt.Printf("  %-10s %-11s %-6s %-6s %10s %10s  %s\n", "DATABASE", "RELFILENODE", "SPC", "SLOT", "OWN KEY", "OTHER KEY", "NAME")
		for _, r := range s.Relations {
			name := "-"
			if r.Name != nil {
				name = *r.Name
			}
			slot := fmt.Sprint(r.KeySlot)
			if r.KeySlot == 0 {
				slot = "none"
			}
			fmt.Printf("  %-10d %-11d %-6d %-6s %10d %10d  %s\n", r.DatabaseOID, r.RelFileNode, r.TablespaceOID, slot, r.BlocksOwnKey, r.BlocksOtherKey, name)
		}
	}
	if k.WAL != nil {
		fmt.Printf("WAL key     slot %d: %d blocks under it", k.WAL.KeySlot, k.WAL.BlocksUnderKey)
		if k.Watched {
			fmt.Printf("; WAL files: %d blocks under the WAL key, %d under another", k.WAL.BlocksOwnKey, k.WAL.BlocksOtherKey)
		}
		fmt.Println()
	} else {
		fmt.Println("WAL key     none yet (created when serve --watch first sees pg_wal)")
	}
	fmt.Printf("volume key  slot %d: %d blocks (filesystem metadata, other files, not yet classified)\n", k.Volume.KeySlot, k.Volume.BlocksUnderKey)
	for _, r := range k.Retiring {
		fmt.Printf("retiring    slot %d (%s %s): %d blocks left to move, then destroyed\n", r.KeySlot, r.Kind, r.Owner, r.Blocks)
	}
	if s.Live != nil && s.Live.Watch != nil {
		for _, p := range s.Live.Watch.PendingShred {
			fmt.Printf("shred due   %s: files gone since %s; key destroyed after %s\n", p.Rel, p.Since.Format(time.RFC3339), p.Due.Format(time.RFC3339))
		}
	}
	fmt.Printf("destroyed   %d keys (crypto-shredded or rotated away)\n", k.Destroyed)
	fmt.Printf("memory      key map %s, block index %s\n", humanBytes(k.KeyMapBytes), humanBytes(k.IndexBytes))
}

// explain adds what to do next to format errors.
func explain(err error) error {
	switch {
	case errors.Is(err, layout.ErrNotVolume):
		return fmt.Errorf("%w; create one with `tdeshim init`", err)
	case errors.Is(err, layout.ErrVersion):
		return fmt.Errorf("%w; use the tdeshim release that created it", err)
	case errors.Is(err, layout.ErrCorrupt):
		return fmt.Errorf("%w; do not write to this volume; restore it from a backup or snapshot", err)
	}
	return err
}
