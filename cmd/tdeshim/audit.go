package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
	"github.com/tdeshim/tdeshim/walwatch"
)

// key audit proves, block by block, that each relation file is encrypted
// with its own relation's key and each WAL segment with the WAL key. It
// does not trust serve's key map or index: it maps files with FIEMAP
// itself, reads their plaintext through the mount, reads the ciphertext
// from the backing store, and decrypts with that owner's key only.

func auditCommand(vol cli.Flag) *cli.Command {
	return &cli.Command{
		Name:  "audit",
		Usage: "check that every relation block is under its own relation's key (and WAL under the WAL key)",
		Description: `For every relation file and WAL segment in --pgdata, each 4 KiB block is
read through the mount (plaintext), located on the volume with FIEMAP, read
from the backing store (ciphertext) and decrypted with the owner's key alone;
the two must match. All-zero blocks hold no data on the volume (FREE) and
are counted apart. Run it on a quiet cluster (stopped, or after CHECKPOINT
with no writes) once the rekeyer has settled (status: 0 blocks pending);
blocks changing under it show up as mismatches.

Exit status 0 only if every non-zero block matched under its own key.`,
		Flags: []cli.Flag{vol,
			&cli.StringFlag{Name: "pgdata", Required: true, Usage: "the data directory on the mounted volume"},
			&cli.BoolFlag{Name: "json", Usage: "machine-readable output"},
		},
		Action: runAudit,
	}
}

// AuditResult is the JSON of key audit.
type AuditResult struct {
	RelationFiles  int          `json:"relation_files"`
	RelationBlocks AuditCounts  `json:"relation_blocks"`
	WALFiles       int          `json:"wal_files"`
	WALBlocks      AuditCounts  `json:"wal_blocks"`
	Problems       []AuditIssue `json:"problems"`
	Seconds        float64      `json:"seconds"`
}

// AuditCounts counts blocks by outcome.
type AuditCounts struct {
	OwnKey   int64 `json:"own_key"`
	Mismatch int64 `json:"mismatch"`
	Zero     int64 `json:"zero"`
	NoKey    int64 `json:"no_key"` // the owner has no active key
}

// AuditIssue is one file with blocks not under its owner's key.
type AuditIssue struct {
	Path     string `json:"path"`
	Blocks   int64  `json:"blocks"`
	FirstOff int64  `json:"first_offset"`
	Why      string `json:"why"`
}

func runAudit(c *cli.Context) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	start := time.Now()
	st, err := store.OpenFileNoLock(c.String("volume"))
	if err != nil {
		return err
	}
	defer st.Close()
	v, err := volume.Open(ctx, st, volume.Options{ReadOnly: true})
	if err != nil {
		return explain(err)
	}
	defer v.Close()
	rels := map[layout.RelKey]uint32{}
	var wal uint32
	for i, sl := range v.Slots() {
		if sl.State != layout.SlotActive {
			continue
		}
		switch sl.Kind {
		case layout.KindRelation:
			rels[sl.Rel()] = uint32(i)
		case layout.KindWAL:
			wal = uint32(i)
		}
	}
	root, err := filepath.Abs(c.String("pgdata"))
	if err != nil {
		return err
	}
	var rootDev uint64
	var rs syscall.Stat_t
	if err := syscall.Stat(root, &rs); err != nil {
		return err
	}
	rootDev = rs.Dev
	tblspc := walwatch.Tablespaces(root)
	res := &AuditResult{Problems: []AuditIssue{}}
	check := func(path, rel string) error {
		o := walwatch.ParsePath(rel)
		var slot uint32
		var counts *AuditCounts
		switch o.Kind {
		case layout.KindRelation:
			slot, counts = rels[o.Rel], &res.RelationBlocks
			res.RelationFiles++
		case layout.KindWAL:
			slot, counts = wal, &res.WALBlocks
			res.WALFiles++
		default:
			return nil
		}
		return auditFile(v, path, slot, counts, res)
	}
	walk := func(dir, prefix string) error {
		return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if d.IsDir() {
				var s syscall.Stat_t
				if syscall.Lstat(p, &s) == nil && s.Dev != rootDev {
					return filepath.SkipDir
				}
				return nil
			}
			if !d.Type().IsRegular() {
				return nil
			}
			r, _ := filepath.Rel(dir, p)
			return check(p, prefix+filepath.ToSlash(r))
		})
	}
	if err := walk(root, ""); err != nil {
		return err
	}
	for dir, o := range tblspc {
		if strings.HasPrefix(dir, root+"/") {
			continue // an in-place tablespace: walked with the data directory
		}
		if err := walk(dir, fmt.Sprintf("pg_tblspc/%d/", o)); err != nil {
			return err
		}
	}
	res.Seconds = time.Since(start).Seconds()
	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.Encode(res)
	} else {
		fmt.Printf("relation files %d: %d blocks under their own key, %d not, %d without a key, %d all-zero (FREE)\n",
			res.RelationFiles, res.RelationBlocks.OwnKey, res.RelationBlocks.Mismatch, res.RelationBlocks.NoKey, res.RelationBlocks.Zero)
		fmt.Printf("WAL segments   %d: %d blocks under the WAL key, %d not, %d without a key, %d all-zero (FREE)\n",
			res.WALFiles, res.WALBlocks.OwnKey, res.WALBlocks.Mismatch, res.WALBlocks.NoKey, res.WALBlocks.Zero)
		sort.Slice(res.Problems, func(i, j int) bool { return res.Problems[i].Blocks > res.Problems[j].Blocks })
		for i, p := range res.Problems {
			if i == 20 {
				fmt.Printf("… and %d more files\n", len(res.Problems)-20)
				break
			}
			fmt.Printf("  %s: %d blocks (first at offset %d): %s\n", p.Path, p.Blocks, p.FirstOff, p.Why)
		}
	}
	if bad := res.RelationBlocks.Mismatch + res.RelationBlocks.NoKey + res.WALBlocks.Mismatch + res.WALBlocks.NoKey; bad > 0 {
		return fmt.Errorf("audit: %d blocks are not under their owner's key (is the rekeyer settled and the cluster quiet?)", bad)
	}
	return nil
}

func auditFile(v *volume.Volume, path string, slot uint32, counts *AuditCounts, res *AuditResult) error {
	exts, err := walwatch.FileExtents(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	defer f.Close()
	plain := make([]byte, layout.BlockSize)
	ct := make([]byte, layout.BlockSize)
	issue := AuditIssue{Path: path, FirstOff: -1}
	for _, e := range exts {
		for off := uint64(0); off < e.Length; off += layout.BlockSize {
			clear(plain)
			n, err := f.ReadAt(plain, int64(e.Logical+off))
			if err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if n == 0 {
				continue // beyond EOF (preallocated)
			}
			blk := (e.Physical + off) / layout.BlockSize
			if bytes.Count(plain, []byte{0}) == len(plain) {
				counts.Zero++
				continue
			}
			bad := ""
			if slot == 0 {
				counts.NoKey++
				bad = "its owner has no active key"
			} else {
				if err := v.ReadCiphertext(ct, blk); err != nil {
					return err
				}
				if err := v.DecryptBlock(slot, ct, ct, blk); err != nil {
					return err
				}
				if bytes.Equal(ct[:n], plain[:n]) {
					counts.OwnKey++
					continue
				}
				counts.Mismatch++
				bad = fmt.Sprintf("does not decrypt under key slot %d", slot)
			}
			if issue.FirstOff < 0 {
				issue.FirstOff, issue.Why = int64(e.Logical+off), bad
			}
			issue.Blocks++
		}
	}
	if issue.Blocks > 0 {
		res.Problems = append(res.Problems, issue)
	}
	return nil
}
