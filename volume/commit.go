package volume

import (
	"fmt"
	"sort"

	"github.com/tdeshim/tdeshim/layout"
)

// Flush makes every write, trim and zero that completed before it durable,
// on every connection: one data sync, then the captured key-map changes in
// one journal append and a second sync. Concurrent flushes share a commit.
func (v *Volume) Flush() error {
	if v.readOnly {
		return nil
	}
	if v.failed.Load() {
		return ErrFailed
	}
	ticket := v.flushTicket.Add(1)
	v.commitMu.Lock()
	defer v.commitMu.Unlock()
	if v.flushedUpTo >= ticket {
		return nil // a commit that started after our request covered it
	}
	covers := v.flushTicket.Load()
	if err := v.commitLocked(false); err != nil {
		return err
	}
	v.flushedUpTo = covers
	return nil
}

// capture swaps out the dirty set and reads the entries' values, with the
// gate held so no operation is between its data write and its entry update.
func (v *Volume) capture() []layout.JournalEntry {
	v.dirtyMu.Lock()
	d := v.dirty
	v.dirty = make(map[uint64]struct{}, len(d))
	v.dirtyMu.Unlock()
	out := make([]layout.JournalEntry, 0, len(d))
	for b := range d {
		e := v.entries[b].Load()
		if e&trimmedFlag != 0 {
			e = layout.FreeEntry
		}
		out = append(out, layout.JournalEntry{Block: b, Value: e})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Block < out[j].Block })
	return out
}

// commitLocked runs one commit; commitMu is held. checkpoint forces the key
// map to be written in place and the journal emptied.
func (v *Volume) commitLocked(checkpoint bool) error {
	v.gate.Lock()
	ents := v.capture()
	need := uint32(0)
	for rest := len(ents); rest > 0; {
		n := min(rest, layout.EntriesPerRecord(maxRecordBlocks))
		need += uint32(layout.RecordBlocks(n))
		rest -= n
	}
	if need == 0 && v.rk.lastIsRekey {
		need = 1
	}
	if checkpoint || v.journalUsed+need > v.geo.JournalRecordBlocks() {
		// Keep the gate: the checkpoint writes in-memory entries, which
		// must all be covered by its data sync.
		defer v.gate.Unlock()
		if err := v.checkpointLocked(ents); err != nil {
			return v.fail(err)
		}
		v.finishTrims(ents)
		return nil
	}
	v.gate.Unlock()

	if err := v.st.Sync(); err != nil {
		return v.fail(fmt.Errorf("volume: sync data: %w", err))
	}
	v.rk.inPlaceUnsynced = false
	if len(ents) == 0 && !v.rk.lastIsRekey {
		v.stats.Commits.Add(1)
		return nil
	}
	// A rekey record last in the journal would be replayed over writes
	// this commit makes durable: an empty record retires it.
	for rest := ents; len(rest) > 0 || v.rk.lastIsRekey; {
		n := min(len(rest), layout.EntriesPerRecord(maxRecordBlocks))
		rec := layout.EncodeJournalRecord(v.epoch, v.nextSeq, rest[:n])
		if _, err := v.st.WriteAt(rec, v.geo.JournalRecordOff(v.journalUsed)); err != nil {
			return v.fail(fmt.Errorf("volume: write journal: %w", err))
		}
		v.journalUsed += uint32(len(rec) / layout.BlockSize)
		v.nextSeq++
		v.rk.lastIsRekey = false
		v.stats.JournalRecs.Add(1)
		for _, e := range rest[:n] {
			v.touchedPages[layout.PageOfBlock(e.Block)] = struct{}{}
		}
		rest = rest[n:]
	}
	if err := v.st.Sync(); err != nil {
		return v.fail(fmt.Errorf("volume: sync journal: %w", err))
	}
	v.stats.Commits.Add(1)
	v.gate.Lock()
	v.finishTrims(ents)
	v.gate.Unlock()
	return nil
}

// maxRecordBlocks bounds one journal record (1 MiB, ~87k entries).
const maxRecordBlocks = 256

// finishTrims runs after FREE entries are durable (gate held exclusively):
// blocks still trimmed become plain FREE and their space is punched.
func (v *Volume) finishTrims(ents []layout.JournalEntry) {
	var runStart, runLen uint64
	flush := func() {
		if runLen > 0 {
			if err := v.st.Punch(v.geo.BlockOff(runStart), int64(runLen)*blockSize); err != nil {
				v.log.Warn("punch hole failed; space stays allocated, data is unaffected", "block", runStart, "blocks", runLen, "err", err)
			}
			v.stats.Punched.Add(runLen)
		}
		runLen = 0
	}
	for _, e := range ents {
		if e.Value != layout.FreeEntry {
			continue
		}
		cur := v.entries[e.Block].Load()
		if cur&trimmedFlag == 0 {
			continue // rewritten since, or already plain FREE
		}
		v.entries[e.Block].Store(layout.FreeEntry)
		if runLen > 0 && runStart+runLen == e.Block {
			runLen++
			continue
		}
		flush()
		runStart, runLen = e.Block, 1
	}
	flush()
}

// checkpointLocked writes every key-map page touched in this epoch (plus
// those of ents) in place, syncs, and starts a new journal epoch. Gate and
// commitMu are held.
func (v *Volume) checkpointLocked(ents []layout.JournalEntry) error {
	if err := v.st.Sync(); err != nil {
		return fmt.Errorf("volume: sync data: %w", err)
	}
	for _, e := range ents {
		v.touchedPages[layout.PageOfBlock(e.Block)] = struct{}{}
	}
	pages := make([]uint64, 0, len(v.touchedPages))
	for p := range v.touchedPages {
		pages = append(pages, p)
	}
	sort.Slice(pages, func(i, j int) bool { return pages[i] < pages[j] })
	for _, p := range pages {
		if _, err := v.st.WriteAt(v.encodePage(p), v.geo.MapPageOff(p)); err != nil {
			return fmt.Errorf("volume: write key-map page %d: %w", p, err)
		}
	}
	if err := v.st.Sync(); err != nil {
		return fmt.Errorf("volume: sync key map: %w", err)
	}
	if _, err := v.st.WriteAt(layout.EncodeJournalSuper(v.epoch+1), v.geo.JournalOff()); err != nil {
		return fmt.Errorf("volume: write journal superblock: %w", err)
	}
	if err := v.st.Sync(); err != nil {
		return fmt.Errorf("volume: sync journal superblock: %w", err)
	}
	v.epoch++
	v.epochSeen.Store(v.epoch)
	v.rk.lastIsRekey, v.rk.inPlaceUnsynced = false, false
	v.nextSeq = 0
	v.journalUsed = 0
	v.touchedPages = map[uint64]struct{}{}
	v.stats.Checkpoints.Add(1)
	v.stats.Commits.Add(1)
	return nil
}

// encodePage encodes page p from the in-memory entries; trimmed entries
// are written as FREE. Only called when every entry is covered by a sync.
func (v *Volume) encodePage(p uint64) []byte {
	lo := p * layout.EntriesPerPage
	hi := min(lo+layout.EntriesPerPage, v.geo.Blocks())
	vals := make([]uint32, hi-lo)
	for i := range vals {
		e := v.entries[lo+uint64(i)].Load()
		if e&trimmedFlag != 0 {
			e = layout.FreeEntry
		}
		vals[i] = e
	}
	return layout.EncodeMapPage(p, vals)
}

func (v *Volume) fail(err error) error {
	v.failed.Store(true)
	v.log.Error("volume failed; restart serve to recover from the last durable state", "err", err)
	return fmt.Errorf("%w: %v", ErrFailed, err)
}
