package volume

import (
	"sort"
	"time"

	"github.com/tdeshim/tdeshim/layout"
)

// KeyReport is the per-key overview status shows: every relation key with
// the blocks of its files under it and under other keys, the WAL and
// volume keys' shares, keys retiring (rotation or shred) and destroyed.
type KeyReport struct {
	Watched   bool             `json:"watched"` // ownership known (serve --watch is indexing)
	Relations []RelationReport `json:"relations"`
	WAL       *KeyShare        `json:"wal"`
	Volume    KeyShare         `json:"volume"`
	Retiring  []RetiringKey    `json:"retiring"`
	Destroyed int              `json:"destroyed_keys"`
	Rekey     *RekeyStats      `json:"rekey,omitempty"`
	// Memory for the key map (4 bytes a block) and the block → file index.
	KeyMapBytes uint64 `json:"key_map_bytes"`
	IndexBytes  uint64 `json:"index_bytes"`
}

// RelationReport is one relfilenode's key state. The JSON names are a
// contract for scripts (status --relations --json).
type RelationReport struct {
	TablespaceOID  uint32    `json:"tablespace_oid"`
	DatabaseOID    uint32    `json:"database_oid"`
	RelFileNode    uint32    `json:"relfilenode"`
	Name           *string   `json:"name"`
	KeySlot        uint32    `json:"key_slot"`
	Principal      uint16    `json:"principal_key"`
	Created        time.Time `json:"key_created"`
	BlocksOwnKey   int64     `json:"blocks_own_key"`
	BlocksOtherKey int64     `json:"blocks_other_key"`
	FileBlocks     int64     `json:"file_blocks"` // blocks its files hold (allocated or not)
}

// KeyShare is the WAL's or the volume key's part of the volume.
type KeyShare struct {
	KeySlot        uint32 `json:"key_slot"`
	BlocksUnderKey int64  `json:"blocks_under_key"`
	BlocksOwnKey   int64  `json:"blocks_own_key,omitempty"`   // WAL: WAL-file blocks under the WAL key
	BlocksOtherKey int64  `json:"blocks_other_key,omitempty"` // WAL: WAL-file blocks under another key
}

// RetiringKey is a key being emptied before destruction.
type RetiringKey struct {
	KeySlot uint32 `json:"key_slot"`
	Kind    string `json:"kind"`
	Owner   string `json:"owner,omitempty"` // tablespace/database/relfilenode
	Blocks  int64  `json:"blocks_left"`
}

// BuildKeyReport computes the report from a key table, a key-map reader,
// the live blocks under each slot and (if known) the index. Used live by
// serve (under = the volume's per-slot counts) and offline by status
// (CountBySlot of the key map).
func BuildKeyReport(slots []layout.Slot, entry func(b uint64) uint32, under func(slot uint32) int64, nblocks uint64, ix *layout.Index, volSlot uint32) KeyReport {
	r := KeyReport{Watched: ix != nil, KeyMapBytes: nblocks * layout.EntrySize}
	byRel := map[layout.RelKey]*RelationReport{}
	var wal *KeyShare
	for i := uint32(1); i < uint32(len(slots)); i++ {
		sl := &slots[i]
		switch sl.State {
		case layout.SlotDestroyed:
			r.Destroyed++
			continue
		case layout.SlotRetiring:
			rk := RetiringKey{KeySlot: i, Kind: kindName(sl.Kind), Blocks: under(i)}
			if sl.Kind == layout.KindRelation {
				rk.Owner = relString(sl.Rel())
			}
			r.Retiring = append(r.Retiring, rk)
			continue
		case layout.SlotActive:
		default:
			continue
		}
		switch sl.Kind {
		case layout.KindRelation:
			k := sl.Rel()
			rr := &RelationReport{TablespaceOID: k.Tablespace, DatabaseOID: k.Database, RelFileNode: k.RelNode,
				KeySlot: i, Principal: sl.Principal, Created: time.Unix(sl.Created, 0).UTC()}
			if ix == nil {
				rr.BlocksOwnKey = under(i) // without the index, every block under its key
			}
			byRel[k] = rr
		case layout.KindWAL:
			wal = &KeyShare{KeySlot: i, BlocksUnderKey: under(i)}
		}
	}
	r.Volume = KeyShare{KeySlot: volSlot, BlocksUnderKey: under(volSlot)}
	if ix != nil {
		r.IndexBytes = ix.MemoryBytes()
		ix.Walk(func(start, n uint64, o layout.Owner) bool {
			switch o.Kind {
			case layout.KindRelation:
				rr := byRel[o.Rel]
				if rr == nil {
					rr = &RelationReport{TablespaceOID: o.Rel.Tablespace, DatabaseOID: o.Rel.Database, RelFileNode: o.Rel.RelNode}
					byRel[o.Rel] = rr
				}
				rr.FileBlocks += int64(n)
				own, other := ownOther(entry, start, min(start+n, nblocks), rr.KeySlot)
				rr.BlocksOwnKey += own
				rr.BlocksOtherKey += other
			case layout.KindWAL:
				if wal == nil {
					wal = &KeyShare{}
				}
				own, other := ownOther(entry, start, min(start+n, nblocks), wal.KeySlot)
				wal.BlocksOwnKey += own
				wal.BlocksOtherKey += other
			}
			return true
		})
	}
	r.WAL = wal
	for _, rr := range byRel {
		r.Relations = append(r.Relations, *rr)
	}
	sort.Slice(r.Relations, func(i, j int) bool {
		a, b := r.Relations[i], r.Relations[j]
		if a.DatabaseOID != b.DatabaseOID {
			return a.DatabaseOID < b.DatabaseOID
		}
		if a.TablespaceOID != b.TablespaceOID {
			return a.TablespaceOID < b.TablespaceOID
		}
		return a.RelFileNode < b.RelFileNode
	})
	return r
}

// ownOther counts the live blocks of [b0, b1) under slot own (0: the
// owner has no key, so every live block is under another).
func ownOther(entry func(b uint64) uint32, b0, b1 uint64, own uint32) (mine, other int64) {
	for b := b0; b < b1; b++ {
		switch e := entry(b); {
		case e == layout.FreeEntry:
		case own != 0 && e == own:
			mine++
		default:
			other++
		}
	}
	return mine, other
}

// CountBySlot counts the blocks of a key map under each slot.
func CountBySlot(entries []uint32) func(slot uint32) int64 {
	n := map[uint32]int64{}
	for _, e := range entries {
		if e != layout.FreeEntry {
			n[e]++
		}
	}
	return func(s uint32) int64 { return n[s] }
}

// KeyReport reports the live volume's keys.
func (v *Volume) KeyReport() KeyReport {
	slots := v.Slots()
	r := BuildKeyReport(slots, func(b uint64) uint32 {
		e := v.entries[b].Load()
		if e&trimmedFlag != 0 {
			return layout.FreeEntry
		}
		return e
	}, v.SlotBlocks, v.geo.Blocks(), v.index.Load(), v.volSlot())
	rs := v.RekeyStatsSnapshot()
	r.Rekey = &rs
	return r
}

// DecryptBlock decrypts one block's ciphertext with the key in slot s
// (for independent checks such as key audit; the I/O path never uses it).
func (v *Volume) DecryptBlock(s uint32, dst, src []byte, block uint64) error {
	c, err := v.cipherFor(s)
	if err != nil {
		return err
	}
	c.DecryptBlocks(dst, src, block)
	return nil
}

// Geometry is the volume's layout.
func (v *Volume) Geometry() layout.Geometry { return v.geo }

// ReadCiphertext reads block b as stored (for independent checks).
func (v *Volume) ReadCiphertext(p []byte, b uint64) error {
	_, err := v.st.ReadAt(p[:blockSize], v.geo.BlockOff(b))
	return err
}
