package volume

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

func blockContent(tag string, b int) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("%s-%04d;", tag, b)), blockSize)[:blockSize]
}

// rekeyScript runs rekeys, client overwrites of rekeyed blocks with
// flushes, a second owner change and a rotation with destruction. It
// returns which acknowledged overwrites happened.
func rekeyScript(v *Volume, nblk int) (acked map[int][]byte) {
	ctx := context.Background()
	acked = map[int][]byte{}
	ix := layout.NewIndex(v.geo.Blocks())
	v.SetIndex(ix)
	r1, r2 := layout.RelKey{Tablespace: 1663, Database: 5, RelNode: 100}, layout.RelKey{Tablespace: 1663, Database: 5, RelNode: 101}
	if _, err := v.EnsureRelationKey(ctx, r1); err != nil {
		return
	}
	ix.SetFile("a", layout.Owner{Kind: layout.KindRelation, Rel: r1}, []layout.IndexExtent{{Start: 0, Len: uint64(nblk)}})
	seen := map[uint64]time.Time{}
	if v.rekeyPass(ctx, ix, seen, 0) != nil {
		return
	}
	// Overwrite a block of the last rekey batch: a replayed rekey record
	// must never bring back its older content.
	last := nblk - 2
	b := blockContent("new", last)
	if v.WriteAt(b, int64(last)*blockSize, false) != nil || v.Flush() != nil {
		return
	}
	acked[last] = b
	if _, err := v.EnsureRelationKey(ctx, r2); err != nil {
		return
	}
	ix.SetFile("a", layout.Owner{Kind: layout.KindRelation, Rel: r2}, []layout.IndexExtent{{Start: 0, Len: uint64(nblk)}})
	if v.rekeyPass(ctx, ix, seen, 0) != nil {
		return
	}
	c := blockContent("newer", nblk-1)
	if v.WriteAt(c, int64(nblk-1)*blockSize, true) != nil {
		return
	}
	acked[nblk-1] = c
	if v.Retire(ctx, v.RelationSlot(r2), true) != nil {
		return
	}
	v.rekeyPass(ctx, ix, seen, 0)
	return acked
}

// TestRekeyCutAfterEveryWrite cuts the power after each write of the
// script (several ways of resolving the unsynced cache each time): the
// volume opens, every block reads its old or new content, every
// acknowledged overwrite is there, and no block names a keyless slot.
func TestRekeyCutAfterEveryWrite(t *testing.T) {
	kf := newKeyFile(t)
	const nblk = 40
	// A journal that holds several rekey records between checkpoints.
	geo := layout.Geometry{Size: 1 << 20, Slots: 16, JournalBlocks: 200}
	st := store.NewCrash(make([]byte, geo.BackingSize()), 512)
	if err := Create(context.Background(), st, geo, openProvider(t, kf), nil); err != nil {
		t.Fatal(err)
	}
	v := mustOpen(t, st, kf)
	for b := 0; b < nblk; b++ {
		if err := v.WriteAt(blockContent("old", b), int64(b)*blockSize, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	base := st.Image()
	// Count the script's writes.
	probe := &limitStore{Crash: store.NewCrash(base, 512), n: 1 << 30}
	pv, err := Open(context.Background(), probe, Options{Provider: openProvider(t, kf), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	probe.n = 1 << 30
	if acked := rekeyScript(pv, nblk); len(acked) != 2 || pv.rk.moved.Load() < 3*nblk || pv.stats.KeysDestroyed.Load() < 1 {
		t.Fatalf("uncut script: %d acked, %d moved, %d destroyed", len(acked), pv.rk.moved.Load(), pv.stats.KeysDestroyed.Load())
	}
	// The per-slot counts every key-map change keeps match the map.
	if got, want := pv.Usage(), scanUsage(pv); !equalUsage(got, want) {
		t.Fatalf("per-slot counts %v, key map says %v", got, want)
	}
	total := 1<<30 - probe.n
	pv.closeKeys()
	for n := 0; n <= total; n++ {
		for seed := int64(0); seed < 4; seed++ {
			ls := &limitStore{Crash: store.NewCrash(base, 512), n: 1 << 30, rng: rand.New(rand.NewSource(seed*1000 + int64(n)))}
			v, err := Open(context.Background(), ls, Options{Provider: openProvider(t, kf), Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			ls.n = n
			acked := rekeyScript(v, nblk)
			v.closeKeys()
			img := ls.img
			switch {
			case seed == 3:
				// Adversarial: the cache kept the journal's writes and
				// lost every data-area write.
				img = ls.Crash.CrashKeeping(func(off, n int64) bool { return off < geo.DataOff() })
			case img == nil:
				img = ls.Crash.Crash(ls.rng)
			}
			v2, err := Open(context.Background(), store.NewCrash(img, 512), Options{Provider: openProvider(t, kf), Logger: quiet})
			if err != nil {
				t.Fatalf("cut after %d writes: volume does not open: %v", n, err)
			}
			got := make([]byte, nblk*blockSize)
			if err := v2.ReadAt(got, 0); err != nil {
				t.Fatalf("cut after %d writes: %v", n, err)
			}
			for b := 0; b < nblk; b++ {
				blk := got[b*blockSize : (b+1)*blockSize]
				if want, ok := acked[b]; ok {
					if !bytes.Equal(blk, want) {
						t.Fatalf("cut after %d writes (seed %d): block %d lost its acknowledged write: %q…", n, seed, b, blk[:16])
					}
					continue
				}
				if !bytes.Equal(blk, blockContent("old", b)) && !bytes.Equal(blk, blockContent("new", b)) && !bytes.Equal(blk, blockContent("newer", b)) {
					t.Fatalf("cut after %d writes (seed %d): block %d is garbage: %x…", n, seed, b, blk[:16])
				}
			}
			for b := range v2.entries {
				if e := v2.entries[b].Load(); e != layout.FreeEntry && !v2.slots[e].HasKey() {
					t.Fatalf("cut after %d writes: block %d names slot %d, which holds no key", n, b, e)
				}
			}
			v2.Close()
		}
	}
	t.Logf("cut at each of %d writes and syncs, 4 cache resolutions each", total+1)
}

// TestVolumeKeyRotationCutBeforeHeader: a new volume key durable but not
// yet named by the header (the rotation's cut point) is retired at open
// and destroyed by the rekeyer; the named key stays.
func TestVolumeKeyRotationCutBeforeHeader(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	v := mustOpen(t, st, kf)
	if err := v.WriteAt(blockContent("old", 3), 3*blockSize, true); err != nil {
		t.Fatal(err)
	}
	v.keyMu.Lock()
	orphan, err := v.newKey(context.Background(), layout.KindVolume, layout.RelKey{})
	v.keyMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	named := v.VolumeSlot()
	v.closeKeys()
	v2, err := Open(context.Background(), store.NewCrash(st.Image(), 512), Options{Provider: openProvider(t, kf), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if got := v2.RetiringSlots(); len(got) != 1 || got[0] != orphan {
		t.Fatalf("retiring after open: %v, want [%d]", got, orphan)
	}
	if err := v2.Settle(context.Background()); err != nil {
		t.Fatal(err)
	}
	if v2.slots[orphan].State != layout.SlotDestroyed || v2.slots[named].State != layout.SlotActive || v2.VolumeSlot() != named {
		t.Fatalf("orphan slot %d state %d, named slot %d state %d", orphan, v2.slots[orphan].State, named, v2.slots[named].State)
	}
	got := make([]byte, blockSize)
	v2.ReadAt(got, 3*blockSize)
	if !bytes.Equal(got, blockContent("old", 3)) {
		t.Fatal("data changed")
	}
}

// scanUsage counts blocks by slot from the key map itself.
func scanUsage(v *Volume) map[uint32]uint64 {
	u := map[uint32]uint64{}
	for i := range v.entries {
		e := v.entries[i].Load()
		if e&trimmedFlag != 0 {
			e = layout.FreeEntry
		}
		u[e]++
	}
	return u
}

func equalUsage(a, b map[uint32]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, n := range a {
		if b[k] != n {
			return false
		}
	}
	return true
}
