package layout

import (
	"fmt"
	"math/rand"
	"testing"
)

func relOwner(rn uint32) Owner {
	return Owner{Kind: KindRelation, Rel: RelKey{Tablespace: DefaultTablespace, Database: 5, RelNode: rn}}
}

func TestIndexSetLookupRemove(t *testing.T) {
	x := NewIndex(3 * IndexChunkBlocks)
	a, b := relOwner(100), Owner{Kind: KindWAL}
	// a spans a chunk boundary.
	x.SetFile("a", a, []IndexExtent{{Start: IndexChunkBlocks - 10, Len: 20}, {Start: 5, Len: 3}})
	x.SetFile("b", b, []IndexExtent{{Start: 100, Len: 50}})
	for blk, want := range map[uint64]Owner{5: a, 7: a, IndexChunkBlocks - 10: a, IndexChunkBlocks + 9: a, 100: b, 149: b} {
		if got, ok := x.Lookup(blk); !ok || got != want {
			t.Errorf("block %d: %+v %v, want %+v", blk, got, ok, want)
		}
	}
	for _, blk := range []uint64{0, 4, 8, 99, 150, IndexChunkBlocks + 10, 3*IndexChunkBlocks + 5} {
		if o, ok := x.Lookup(blk); ok {
			t.Errorf("block %d: unexpectedly owned by %+v", blk, o)
		}
	}
	// b is reported to own part of a's range: newest report wins.
	x.SetFile("b", b, []IndexExtent{{Start: IndexChunkBlocks - 5, Len: 2}})
	if o, _ := x.Lookup(IndexChunkBlocks - 5); o != b {
		t.Errorf("overlap: %+v, want the newer file", o)
	}
	if o, _ := x.Lookup(IndexChunkBlocks - 6); o != a {
		t.Errorf("left of overlap: %+v", o)
	}
	if _, ok := x.Lookup(100); ok {
		t.Error("b's old extent is still indexed")
	}
	// Removing a leaves b's part alone.
	x.RemoveFile("a")
	if o, ok := x.Lookup(IndexChunkBlocks - 5); !ok || o != b {
		t.Errorf("after removing a: %+v %v", o, ok)
	}
	if _, ok := x.Lookup(5); ok {
		t.Error("removed file still indexed")
	}
	if got := x.Relations(); len(got) != 0 {
		t.Errorf("relations after removal: %v", got)
	}
}

// TestIndexMatchesModel checks the index against a per-block model under
// random file updates and removals.
func TestIndexMatchesModel(t *testing.T) {
	const blocks = 2*IndexChunkBlocks + 1000
	rng := rand.New(rand.NewSource(1))
	x := NewIndex(blocks)
	model := make([]int, blocks) // file number + 1, 0 = none
	files := map[int][]IndexExtent{}
	for step := 0; step < 400; step++ {
		f := rng.Intn(20)
		name := fmt.Sprint(f)
		if rng.Intn(5) == 0 {
			x.RemoveFile(name)
			for i := range model {
				if model[i] == f+1 {
					model[i] = 0
				}
			}
			delete(files, f)
			continue
		}
		var ext []IndexExtent
		for k := rng.Intn(4) + 1; k > 0; k-- {
			ext = append(ext, IndexExtent{Start: uint64(rng.Intn(blocks)), Len: uint64(rng.Intn(3000) + 1)})
		}
		x.SetFile(name, relOwner(uint32(f+1)), ext)
		for i := range model {
			if model[i] == f+1 {
				model[i] = 0
			}
		}
		for _, e := range ext {
			for b := e.Start; b < e.Start+e.Len && b < blocks; b++ {
				model[b] = f + 1
			}
		}
		files[f] = ext
	}
	for b := range model {
		o, ok := x.Lookup(uint64(b))
		if model[b] == 0 {
			if ok {
				t.Fatalf("block %d: owned by %+v, model says free", b, o)
			}
		} else if !ok || o.Rel.RelNode != uint32(model[b]) {
			t.Fatalf("block %d: %+v %v, model says file %d", b, o, ok, model[b]-1)
		}
	}
}

// TestIndexMemoryPerTiB fills the index of a 10 GiB device with a
// typical PostgreSQL layout — 1 GiB table segments in 128 MiB ext4
// extents, fragmented one extent in four; 3000 small catalog and fork
// files; 16 MiB WAL segments — and extrapolates to 1 TiB. Goal: ≤ 64 MiB.
func TestIndexMemoryPerTiB(t *testing.T) {
	const gib = 1 << 30 / BlockSize
	blocks := uint64(10 * gib)
	x := NewIndex(blocks)
	next := uint64(0)
	file := 0
	alloc := func(n uint64, frag int) []IndexExtent {
		var out []IndexExtent
		for n > 0 {
			l := min(n, uint64(IndexChunkBlocks))
			if frag > 0 && file%frag == 0 {
				l = min(l, 2048) // a fragmented file: 8 MiB extents
			}
			out = append(out, IndexExtent{Start: next, Len: l})
			next += l + 1
			n -= l
		}
		return out
	}
	for next < blocks*8/10 {
		file++
		x.SetFile(fmt.Sprintf("base/5/%d", 16384+file), relOwner(uint32(16384+file)), alloc(gib/4, 4))
	}
	for i := 0; i < 3000 && next < blocks; i++ {
		file++
		x.SetFile(fmt.Sprintf("base/5/%d", 1000+i), relOwner(uint32(1000+i)), alloc(uint64(rand.Intn(32)+1), 0))
	}
	for next+4096 < blocks {
		file++
		x.SetFile(fmt.Sprintf("pg_wal/%024X", file), Owner{Kind: KindWAL}, alloc(4096, 0))
	}
	per := x.MemoryBytes() * 1024 / 10 // bytes per TiB
	t.Logf("index: %d files, %d bytes for 10 GiB → %.1f MiB per TiB (goal ≤ 64 MiB)", file, x.MemoryBytes(), float64(per)/(1<<20))
	if per > 64<<20 {
		t.Fatalf("index needs %d MiB per TiB", per>>20)
	}
}

func TestRelKeyString(t *testing.T) {
	if got := (RelKey{Tablespace: 1663, Database: 5, RelNode: 16384}).String(); got != "1663/5/16384" {
		t.Fatalf("RelKey.String = %q", got)
	}
}
