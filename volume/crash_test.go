package volume

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

// keyer churns keys while the writers run: relation keys, index files,
// rotations, shreds and rekey passes. Errors end it (the store crashed).
func keyer(v *Volume, r *rand.Rand, ops *atomic.Uint64, crashAt uint64, blocks uint64) {
	ctx := context.Background()
	ix := layout.NewIndex(blocks)
	v.SetIndex(ix)
	rels := []layout.RelKey{{Tablespace: 1663, Database: 5, RelNode: 100}, {Tablespace: 1663, Database: 5, RelNode: 101}, {Tablespace: 1663, Database: 6, RelNode: 200}, {Tablespace: 1664, RelNode: 300}}
	seen := map[uint64]time.Time{}
	for ops.Load() < crashAt {
		rel := rels[r.Intn(len(rels))]
		var err error
		switch k := r.Intn(10); {
		case k < 3:
			_, err = v.EnsureRelationKey(ctx, rel)
		case k < 5:
			start := uint64(r.Intn(int(blocks)))
			n := uint64(r.Intn(64) + 1)
			o := layout.Owner{Kind: layout.KindRelation, Rel: rel}
			if r.Intn(4) == 0 {
				o = layout.Owner{Kind: layout.KindWAL}
				_, err = v.EnsureWALKey(ctx)
			}
			ix.SetFile(fmt.Sprintf("f%d", r.Intn(6)), o, []layout.IndexExtent{{Start: start, Len: n}})
		case k < 6:
			if s := v.RelationSlot(rel); s != 0 {
				err = v.Retire(ctx, s, r.Intn(2) == 0) // rotate or shred
			} else if r.Intn(8) == 0 {
				err = v.Retire(ctx, v.VolumeSlot(), true)
			}
		default:
			err = v.rekeyPass(ctx, ix, seen, 0)
		}
		ops.Add(1)
		if err != nil {
			return
		}
	}
}

// The crash test drives a volume on the volatile-cache store with several
// writers (each owning a disjoint set of blocks, so each sector has one
// ordered history), trims, zeroes and flushes, pulls the power at a random
// point, reopens and checks every 512-byte sector: it must hold its
// content as of the last flush that completed, or a content written after.
// Never garbage, never older, and the volume always opens.

const sector = 512

type version struct {
	id  uint64 // 0 = zeros
	ack uint64 // clock when acknowledged; 0 = never acknowledged
}

type history struct {
	mu  sync.Mutex
	sec [][]version // per sector
}

func sectorContent(id uint64, sec uint64) []byte {
	b := make([]byte, sector)
	if id == 0 {
		return b
	}
	for i := 0; i < sector; i += 16 {
		binary.LittleEndian.PutUint64(b[i:], id)
		binary.LittleEndian.PutUint64(b[i+8:], sec)
	}
	return b
}

func crashIterations() int {
	if n, err := strconv.Atoi(os.Getenv("TDESHIM_CRASH_ITERATIONS")); err == nil && n > 0 {
		return n
	}
	return 40
}

func TestCrashAtRandomPointsReadsOldOrNew(t *testing.T) { runCrashTest(t, false) }

// TestCrashWithRekeysReadsOldOrNew adds, beside the writers, a keyer that
// creates relation keys, maps block ranges to relations in the index,
// rotates and shreds keys (relation and volume) and runs the rekeyer:
// contents must never change through any of it, whatever the crash point.
func TestCrashWithRekeysReadsOldOrNew(t *testing.T) { runCrashTest(t, true) }

func runCrashTest(t *testing.T, withKeys bool) {
	kf := newKeyFile(t)
	const size = 2 << 20
	const sectors = size / sector
	var moved, destroyed uint64
	for iter := 0; iter < crashIterations(); iter++ {
		seed := int64(iter*7919 + 1)
		rng := rand.New(rand.NewSource(seed))
		st, _ := newCrashVolume(t, size, kf)
		v := mustOpen(t, st, kf)
		h := &history{sec: make([][]version, sectors)}
		for i := range h.sec {
			h.sec[i] = []version{{id: 0, ack: 1}}
		}
		var clock, nextID atomic.Uint64
		clock.Store(2)
		var flushMu sync.Mutex
		var lastFlushStart uint64 // start clock of the latest completed flush
		crashAt := uint64(rng.Intn(600) + 20)
		var ops atomic.Uint64
		var crashOnce sync.Once
		var crashImg []byte
		crash := func() {
			crashOnce.Do(func() { crashImg = st.Crash(rand.New(rand.NewSource(seed))) })
		}
		const writers = 4
		var wg sync.WaitGroup
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				r := rand.New(rand.NewSource(seed*31 + int64(w)))
				for ops.Add(1) < crashAt {
					// Groups of 8 blocks; writer w owns groups g%writers==w.
					g := uint64(r.Intn(size/4096/8/writers)*writers + w)
					blk := g*8 + uint64(r.Intn(8))
					nblk := uint64(r.Intn(int(g*8+8-blk))) + 1
					first, last := blk*8, (blk+nblk)*8 // sectors
					var err error
					var ids []uint64
					switch k := r.Intn(10); {
					case k < 6: // write, maybe sub-block
						if k == 0 {
							first += uint64(r.Intn(8))
							last = first + uint64(r.Intn(int(last-first)))/2 + 1
						}
						ids = make([]uint64, last-first)
						buf := make([]byte, 0, (last-first)*sector)
						for s := first; s < last; s++ {
							ids[s-first] = nextID.Add(1)
							buf = append(buf, sectorContent(ids[s-first], s)...)
						}
						h.record(first, ids, 0)
						err = v.WriteAt(buf, int64(first*sector), r.Intn(8) == 0)
					case k < 8: // trim or zero: zeros
						ids = make([]uint64, last-first)
						h.record(first, ids, 0)
						if k == 6 {
							err = v.Trim(int64(first*sector), int64((last-first)*sector), false)
						} else {
							err = v.Zero(int64(first*sector), int64((last-first)*sector), r.Intn(2) == 0, false, false)
						}
					default:
						start := clock.Add(1)
						if v.Flush() == nil {
							flushMu.Lock()
							lastFlushStart = max(lastFlushStart, start)
							flushMu.Unlock()
						}
						continue
					}
					if err != nil {
						return // crashed under us
					}
					h.ack(first, ids, clock.Add(1))
				}
				crash()
			}(w)
		}
		if withKeys {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer crash()
				keyer(v, rand.New(rand.NewSource(seed*17)), &ops, crashAt, size/4096)
			}()
		}
		wg.Wait()
		crash()
		if withKeys {
			if got, want := v.Usage(), scanUsage(v); !equalUsage(got, want) {
				t.Fatalf("seed %d: per-slot counts %v, key map says %v", seed, got, want)
			}
		}
		moved += v.rk.moved.Load()
		destroyed += v.stats.KeysDestroyed.Load()
		v.closeKeys()
		v2, err := Open(context.Background(), store.NewCrash(crashImg, sector), Options{Provider: openProvider(t, kf), Logger: quiet})
		if err != nil {
			t.Fatalf("seed %d: volume does not open after crash: %v", seed, err)
		}
		got := make([]byte, size)
		if err := v2.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		for b := range v2.entries {
			if e := v2.entries[b].Load(); e != layout.FreeEntry && !v2.slots[e].HasKey() {
				t.Fatalf("seed %d: block %d names slot %d, which holds no key", seed, b, e)
			}
		}
		v2.Close()
		for s := uint64(0); s < sectors; s++ {
			if err := h.check(s, got[s*sector:(s+1)*sector], lastFlushStart); err != nil {
				t.Fatalf("seed %d (crash after %d ops): %v", seed, crashAt, err)
			}
		}
	}
	if withKeys {
		t.Logf("%d blocks rekeyed, %d keys destroyed before the crashes", moved, destroyed)
		if moved == 0 || destroyed == 0 {
			t.Fatalf("the keyer never rekeyed (%d) or destroyed (%d): the test exercised nothing", moved, destroyed)
		}
	}
}

// record appends unacknowledged versions for sectors first.. (ids[i]).
func (h *history) record(first uint64, ids []uint64, _ uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, id := range ids {
		h.sec[first+uint64(i)] = append(h.sec[first+uint64(i)], version{id: id})
	}
}

// ack stamps the latest versions of those sectors as acknowledged at c.
func (h *history) ack(first uint64, ids []uint64, c uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := range ids {
		vs := h.sec[first+uint64(i)]
		vs[len(vs)-1].ack = c
	}
}

// check: the sector must hold the version that was current when the last
// completed flush started (the floor) or any later version.
func (h *history) check(s uint64, got []byte, flushStart uint64) error {
	vs := h.sec[s]
	floor := 0
	for i, v := range vs {
		if v.ack != 0 && v.ack < flushStart {
			floor = i
		}
	}
	for _, v := range vs[floor:] {
		if bytes.Equal(got, sectorContent(v.id, s)) {
			return nil
		}
	}
	var ids []string
	for _, v := range vs {
		ids = append(ids, fmt.Sprintf("%d@%d", v.id, v.ack))
	}
	return fmt.Errorf("sector %d holds %x…, not one of versions %v from index %d on (flush floor %d)", s, got[:16], ids, floor, flushStart)
}
