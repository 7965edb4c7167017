package volume

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tdeshim/tdeshim/layout"
)

// The rekeyer is the only way a live block changes key (DESIGN.md
// invariant 5). One batch, all under commitMu so no commit interleaves:
//
//  1. if an earlier rekey's in-place writes are not yet synced, sync;
//  2. read the blocks, decrypt with their slot, encrypt with the target's;
//  3. append a rekey record (entries + new ciphertext) to the journal, sync;
//  4. write the new ciphertext in place and point the entries at the target.
//
// Replay sets the entries from every rekey record. The journal's last
// record, if it is a rekey record, may have torn in-place writes, so
// replay rewrites its ciphertext; any later record retires it, because
// every record is written after a sync that covers earlier in-place
// writes (step 1 for rekey records; the data sync of a commit for map
// records, which also writes an empty record when a rekey record is last,
// so a FLUSH never leaves one to be replayed over newer writes).

// rekeyState is the rekeyer's bookkeeping.
type rekeyState struct {
	// Under commitMu.
	lastIsRekey     bool // the journal's last record is a rekey record
	inPlaceUnsynced bool // a rekey wrote in place since the last sync

	gen     atomic.Uint64 // bumped by changes that can create mismatches
	moved   atomic.Uint64 // blocks rekeyed
	bytes   atomic.Uint64 // bytes the rekeyer wrote (journal + in place)
	pending atomic.Int64  // blocks found under the wrong key, not yet moved
	oldest  atomic.Int64  // unix nanoseconds the oldest pending was seen, 0 if none
	kick    chan struct{}

	mu   sync.Mutex
	lags []time.Duration // recent per-block lags, a ring
	lagN int
}

const lagRing = 8192

// maxRekeyBatch bounds one rekey record (and the stripes it locks).
const (
	maxRekeyBatch  = 32
	rekeyWindow    = 256 // blocks: a batch's span, so it locks few stripes
	rekeyBlockCost = 2 * blockSize
)

func (v *Volume) maxBatch() int {
	return max(1, min(maxRekeyBatch, int(v.geo.JournalRecordBlocks())-1))
}

// rekeyBatch moves the blocks (sorted, within rekeyWindow) that target
// says belong under another slot. It returns the moves made.
func (v *Volume) rekeyBatch(blocks []uint64, target func(b uint64, e uint32) uint32) ([]layout.RekeyEntry, error) {
	if err := v.writable(); err != nil {
		return nil, err
	}
	if len(blocks) == 0 {
		return nil, nil
	}
	b0, b1 := blocks[0], blocks[len(blocks)-1]+1
	need := uint32(layout.RekeyRecordBlocks(len(blocks)))
	v.commitMu.Lock()
	defer v.commitMu.Unlock()
	if need > v.geo.JournalRecordBlocks() {
		return nil, fmt.Errorf("volume: rekey batch of %d blocks does not fit the journal", len(blocks))
	}
	if v.journalUsed+need > v.geo.JournalRecordBlocks() {
		if err := v.commitLocked(true); err != nil {
			return nil, err
		}
	}
	v.gate.RLock()
	defer v.gate.RUnlock()
	if v.suspended.Load() {
		return nil, ErrSuspended
	}
	unlock := v.lockStripes(b0, b1, true)
	defer unlock()

	var ents []layout.RekeyEntry
	for _, b := range blocks {
		e := v.entries[b].Load()
		if e == layout.FreeEntry || e&trimmedFlag != 0 {
			continue
		}
		t := target(b, e)
		if t == 0 || t == e {
			continue
		}
		if _, err := v.cipherFor(e); err != nil {
			continue // its principal key is unavailable: leave it
		}
		if _, err := v.cipherFor(t); err != nil {
			continue
		}
		ents = append(ents, layout.RekeyEntry{Block: b, From: e, To: t})
	}
	if len(ents) == 0 {
		return nil, nil
	}
	data := make([]byte, len(ents)*blockSize)
	for i, en := range ents {
		blk := data[i*blockSize : (i+1)*blockSize]
		if _, err := v.st.ReadAt(blk, v.geo.BlockOff(en.Block)); err != nil {
			return nil, fmt.Errorf("volume: rekey: read block %d: %w", en.Block, err)
		}
		from, _ := v.cipherFor(en.From)
		to, _ := v.cipherFor(en.To)
		from.DecryptBlocks(blk, blk, en.Block)
		to.EncryptBlocks(blk, blk, en.Block)
	}
	if v.rk.inPlaceUnsynced {
		if err := v.st.Sync(); err != nil {
			return nil, v.fail(fmt.Errorf("volume: sync before rekey: %w", err))
		}
		v.rk.inPlaceUnsynced = false
	}
	rec := layout.EncodeRekeyRecord(v.epoch, v.nextSeq, ents, data)
	if _, err := v.st.WriteAt(rec, v.geo.JournalRecordOff(v.journalUsed)); err != nil {
		return nil, v.fail(fmt.Errorf("volume: write rekey record: %w", err))
	}
	if err := v.st.Sync(); err != nil {
		return nil, v.fail(fmt.Errorf("volume: sync rekey record: %w", err))
	}
	v.journalUsed += uint32(len(rec) / blockSize)
	v.nextSeq++
	v.rk.lastIsRekey = true
	v.stats.JournalRecs.Add(1)
	v.rk.inPlaceUnsynced = true
	for i, en := range ents {
		if _, err := v.st.WriteAt(data[i*blockSize:(i+1)*blockSize], v.geo.BlockOff(en.Block)); err != nil {
			return nil, v.fail(fmt.Errorf("volume: rekey: write block %d: %w", en.Block, err))
		}
	}
	for _, en := range ents {
		v.entries[en.Block].Store(en.To)
		v.counts[en.From].Add(-1)
		v.counts[en.To].Add(1)
		v.touchedPages[layout.PageOfBlock(en.Block)] = struct{}{}
	}
	v.rk.moved.Add(uint64(len(ents)))
	v.rk.bytes.Add(uint64(len(rec) + len(data)))
	return ents, nil
}

// rekeyTarget is the slot block b (now under e) belongs under, or 0 to
// leave it. A block whose owner the index knows belongs under its owner's
// key. A block under a retiring key must leave it: to its owner's key, or
// else its old owner's successor, or else the volume key. Unowned blocks
// under a live key stay (the watcher may not have seen their file yet).
func (v *Volume) rekeyTarget(ix *layout.Index, b uint64, e uint32) uint32 {
	v.own.mu.RLock()
	defer v.own.mu.RUnlock()
	old, retiring := v.own.retiring[e]
	if ix != nil {
		if o, ok := ix.Lookup(b); ok {
			if t := v.slotForOwner(o); t != 0 {
				return t
			}
		}
	}
	if !retiring {
		return 0
	}
	if t := v.slotForOwner(old); t != 0 && t != e {
		return t
	}
	return v.volSlot()
}

// RekeyOptions tune the background rekeyer.
type RekeyOptions struct {
	// Rate bounds the rekeyer's writes, in bytes per second of blocks
	// moved (each costs a journal copy and an in-place write); 0 means
	// no limit.
	Rate int64
	// Interval between sweeps for blocks under the wrong key.
	Interval time.Duration
}

// KickRekeyer asks for a sweep now (after a rotation, say).
func (v *Volume) KickRekeyer() {
	v.rk.gen.Add(1)
	select {
	case v.rk.kick <- struct{}{}:
	default:
	}
}

// RunRekeyer sweeps for blocks under the wrong key and moves them until
// ctx ends. It never blocks the I/O path for longer than one batch holds
// its stripes.
func (v *Volume) RunRekeyer(ctx context.Context, opt RekeyOptions) {
	if v.readOnly {
		return
	}
	if opt.Interval <= 0 {
		opt.Interval = time.Second
	}
	t := time.NewTicker(opt.Interval)
	defer t.Stop()
	firstSeen := map[uint64]time.Time{}
	var lastIx, lastGen uint64 = ^uint64(0), ^uint64(0)
	for {
		ix := v.index.Load()
		ixGen := uint64(0)
		if ix != nil {
			ixGen = ix.Gen()
		}
		gen := v.rk.gen.Load()
		if ixGen != lastIx || gen != lastGen || len(firstSeen) > 0 || len(v.RetiringSlots()) > 0 {
			lastIx, lastGen = ixGen, gen
			if err := v.rekeyPass(ctx, ix, firstSeen, opt.Rate); err != nil {
				if ctx.Err() != nil {
					return
				}
				v.log.Warn("rekeyer pass failed; retrying at the next sweep", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-v.rk.kick:
		}
	}
}

// rekeyPass sweeps once, moves what it finds (throttled), then destroys
// retiring keys that no block uses any more.
func (v *Volume) rekeyPass(ctx context.Context, ix *layout.Index, firstSeen map[uint64]time.Time, rate int64) error {
	cand := v.sweep(ix)
	now := time.Now()
	inCand := make(map[uint64]struct{}, len(cand))
	for _, b := range cand {
		inCand[b] = struct{}{}
		if _, ok := firstSeen[b]; !ok {
			firstSeen[b] = now
		}
	}
	for b := range firstSeen {
		if _, ok := inCand[b]; !ok {
			delete(firstSeen, b) // settled some other way (trimmed, rewritten owner)
		}
	}
	v.publishPending(firstSeen)
	target := func(b uint64, e uint32) uint32 { return v.rekeyTarget(ix, b, e) }
	maxB := v.maxBatch()
	start := time.Now()
	var done int64
	var moves [4][4]int // by kind: from, to
	defer func() {
		if done > 0 {
			v.log.Debug("rekeyer pass", "candidates", len(cand), "blocks_moved", done/rekeyBlockCost,
				"volume_to_relation", moves[layout.KindVolume][layout.KindRelation], "volume_to_wal", moves[layout.KindVolume][layout.KindWAL],
				"relation_to_relation", moves[layout.KindRelation][layout.KindRelation], "to_volume", moves[layout.KindRelation][layout.KindVolume]+moves[layout.KindWAL][layout.KindVolume]+moves[layout.KindVolume][layout.KindVolume],
				"seconds", time.Since(start).Seconds())
		}
	}()
	for i := 0; i < len(cand); {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		j := i + 1
		for j < len(cand) && j-i < maxB && cand[j] < cand[i]+rekeyWindow {
			j++
		}
		moved, err := v.rekeyBatch(cand[i:j], target)
		if err != nil {
			return err
		}
		t := time.Now()
		v.slotsMu.Lock()
		for _, m := range moved {
			moves[v.slots[m.From].Kind&3][v.slots[m.To].Kind&3]++
		}
		v.slotsMu.Unlock()
		for _, m := range moved {
			v.recordLag(t.Sub(firstSeen[m.Block]))
			delete(firstSeen, m.Block)
		}
		v.publishPending(firstSeen)
		done += int64(len(moved)) * rekeyBlockCost
		if rate > 0 {
			due := start.Add(time.Duration(float64(done) / float64(rate) * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(d):
				}
			}
		}
		i = j
	}
	for _, s := range v.RetiringSlots() {
		if _, err := v.destroyIfEmpty(s); err != nil {
			return err
		}
	}
	return nil
}

// sweep lists, in block order, live blocks that may belong under another
// key: blocks of known files under a key other than their owner's, and
// every block under a retiring key.
func (v *Volume) sweep(ix *layout.Index) []uint64 {
	var out []uint64
	if ix != nil {
		ix.Walk(func(start, n uint64, o layout.Owner) bool {
			v.own.mu.RLock()
			t := v.slotForOwner(o)
			v.own.mu.RUnlock()
			if t == 0 {
				return true
			}
			for b := start; b < start+n && b < uint64(len(v.entries)); b++ {
				e := v.entries[b].Load()
				if e != t && e != layout.FreeEntry && e&trimmedFlag == 0 {
					out = append(out, b)
				}
			}
			return true
		})
	}
	v.own.mu.RLock()
	ret := make([]bool, len(v.counts))
	any := false
	for s := range v.own.retiring {
		any = true
		ret[s] = true
	}
	v.own.mu.RUnlock()
	if any {
		for b := range v.entries {
			if e := v.entries[b].Load(); e&trimmedFlag == 0 && ret[e] {
				out = append(out, uint64(b))
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	// Dedupe (a block can be both).
	w := 0
	for i, b := range out {
		if i == 0 || b != out[w-1] {
			out[w] = b
			w++
		}
	}
	return out[:w]
}

func (v *Volume) publishPending(firstSeen map[uint64]time.Time) {
	v.rk.pending.Store(int64(len(firstSeen)))
	var oldest int64
	for _, t := range firstSeen {
		if n := t.UnixNano(); oldest == 0 || n < oldest {
			oldest = n
		}
	}
	v.rk.oldest.Store(oldest)
}

func (v *Volume) recordLag(d time.Duration) {
	v.rk.mu.Lock()
	defer v.rk.mu.Unlock()
	if len(v.rk.lags) < lagRing {
		v.rk.lags = append(v.rk.lags, d)
	} else {
		v.rk.lags[v.rk.lagN%lagRing] = d
	}
	v.rk.lagN++
}

// RekeyStats is the rekeyer's state at a glance.
type RekeyStats struct {
	PendingBlocks  int64   `json:"pending_blocks"`
	LagSeconds     float64 `json:"lag_seconds"` // age of the oldest pending block
	MovedBlocks    uint64  `json:"moved_blocks"`
	RekeyBytes     uint64  `json:"rekey_bytes"`
	ClientBytes    uint64  `json:"client_bytes"`
	Amplification  float64 `json:"amplification"` // rekey bytes / client bytes
	LagP50Seconds  float64 `json:"lag_p50_seconds"`
	LagP99Seconds  float64 `json:"lag_p99_seconds"`
	RetiringSlots  int     `json:"retiring_slots"`
	RetiringBlocks int64   `json:"retiring_blocks"`
}

// RekeyStatsSnapshot reports the rekeyer's lag and amplification.
func (v *Volume) RekeyStatsSnapshot() RekeyStats {
	s := RekeyStats{
		PendingBlocks: v.rk.pending.Load(),
		MovedBlocks:   v.rk.moved.Load(),
		RekeyBytes:    v.rk.bytes.Load(),
		ClientBytes:   v.stats.ClientWritten.Load(),
	}
	if o := v.rk.oldest.Load(); o != 0 {
		s.LagSeconds = time.Since(time.Unix(0, o)).Seconds()
	}
	if s.ClientBytes > 0 {
		s.Amplification = float64(s.RekeyBytes) / float64(s.ClientBytes)
	}
	v.rk.mu.Lock()
	lags := append([]time.Duration(nil), v.rk.lags...)
	v.rk.mu.Unlock()
	if len(lags) > 0 {
		sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
		s.LagP50Seconds = lags[len(lags)/2].Seconds()
		s.LagP99Seconds = lags[min(len(lags)-1, len(lags)*99/100)].Seconds()
	}
	for _, r := range v.RetiringSlots() {
		s.RetiringSlots++
		s.RetiringBlocks += v.counts[r].Load()
	}
	return s
}

// SlotBlocks is the number of live blocks under slot s.
func (v *Volume) SlotBlocks(s uint32) int64 {
	if int(s) >= len(v.counts) {
		return 0
	}
	return v.counts[s].Load()
}

// Settle runs rekey passes until nothing is pending and no key is
// retiring, or ctx ends: for tests and offline rotation. A pass that moves
// nothing while work remains (blocks whose key is unavailable) is an
// error, not a loop.
func (v *Volume) Settle(ctx context.Context) error {
	firstSeen := map[uint64]time.Time{}
	for {
		before := v.rk.moved.Load()
		destroyed := v.stats.KeysDestroyed.Load()
		if err := v.rekeyPass(ctx, v.index.Load(), firstSeen, 0); err != nil {
			return err
		}
		left, retiring := len(v.sweep(v.index.Load())), len(v.RetiringSlots())
		if left == 0 && retiring == 0 {
			return nil
		}
		if v.rk.moved.Load() == before && v.stats.KeysDestroyed.Load() == destroyed {
			return fmt.Errorf("volume: %d blocks cannot be moved and %d keys stay retiring (their key or their target's is unavailable — a revoked principal key?)", left, retiring)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// ResetRekeyStats zeroes the rekeyer's counters, lag samples and the
// client byte count, so a benchmark can measure one workload.
func (v *Volume) ResetRekeyStats() {
	v.rk.moved.Store(0)
	v.rk.bytes.Store(0)
	v.stats.ClientWritten.Store(0)
	v.rk.mu.Lock()
	v.rk.lags, v.rk.lagN = nil, 0
	v.rk.mu.Unlock()
}
