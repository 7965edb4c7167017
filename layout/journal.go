package layout

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// The journal makes key-map changes durable with one sequential write and
// one sync per commit. Block 0 of the journal region is the superblock: it
// names the current epoch. Records follow from block 1, each a whole number
// of blocks, numbered 0, 1, 2 … within an epoch. A checkpoint writes the
// key-map pages in place, then bumps the epoch, which retires every record
// at once. Replay applies records of the current epoch in sequence order
// and stops at the first that is missing, stale or fails its checksum.

var (
	journalSuperMagic  = [8]byte{'T', 'D', 'J', 'S', 'U', 'P', 'E', 'R'}
	journalRecordMagic = [8]byte{'T', 'D', 'J', 'R', 'E', 'C', 0, 0}
)

const (
	recordHeaderSize = 40
	journalEntrySize = 12 // block u64, value u32
)

// JournalEntry records the key-map value of one block.
type JournalEntry struct {
	Block uint64
	Value uint32
}

// EntriesPerRecord is how many entries a record of n blocks holds.
func EntriesPerRecord(nblocks int) int {
	return (nblocks*BlockSize - recordHeaderSize) / journalEntrySize
}

// RecordBlocks is the number of blocks a record of n entries needs.
func RecordBlocks(n int) int {
	return (recordHeaderSize + n*journalEntrySize + BlockSize - 1) / BlockSize
}

// EncodeJournalSuper encodes the superblock for epoch.
func EncodeJournalSuper(epoch uint64) []byte {
	b := make([]byte, BlockSize)
	copy(b, journalSuperMagic[:])
	binary.LittleEndian.PutUint64(b[8:], epoch)
	binary.LittleEndian.PutUint32(b[BlockSize-4:], crc(b[:BlockSize-4]))
	return b
}

// DecodeJournalSuper returns the epoch in a superblock.
func DecodeJournalSuper(b []byte) (uint64, error) {
	if len(b) < BlockSize || !bytes.Equal(b[:8], journalSuperMagic[:]) {
		return 0, fmt.Errorf("%w journal superblock: bad magic", ErrCorrupt)
	}
	if binary.LittleEndian.Uint32(b[BlockSize-4:]) != crc(b[:BlockSize-4]) {
		return 0, fmt.Errorf("%w journal superblock: checksum", ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(b[8:]), nil
}

// EncodeJournalRecord encodes one record; its length is a whole number of
// blocks.
func EncodeJournalRecord(epoch, seq uint64, entries []JournalEntry) []byte {
	nblocks := RecordBlocks(len(entries))
	b := make([]byte, nblocks*BlockSize)
	le := binary.LittleEndian
	copy(b, journalRecordMagic[:])
	le.PutUint64(b[8:], epoch)
	le.PutUint64(b[16:], seq)
	le.PutUint32(b[24:], uint32(len(entries)))
	le.PutUint32(b[28:], uint32(nblocks))
	off := recordHeaderSize
	for _, e := range entries {
		le.PutUint64(b[off:], e.Block)
		le.PutUint32(b[off+8:], e.Value)
		off += journalEntrySize
	}
	le.PutUint32(b[32:], crc(b[:32], b[36:]))
	return b
}

// RecordInfo is what the first block of a record says about it.
type RecordInfo struct {
	Epoch, Seq uint64
	Entries    int
	Blocks     int
}

// PeekJournalRecord reads the header in a record's first block, so the
// caller knows how many blocks to read. ok is false for anything that is
// not a record header (the end of the journal).
func PeekJournalRecord(b []byte) (RecordInfo, bool) {
	if len(b) < recordHeaderSize || !bytes.Equal(b[:8], journalRecordMagic[:]) {
		return RecordInfo{}, false
	}
	le := binary.LittleEndian
	ri := RecordInfo{
		Epoch:   le.Uint64(b[8:]),
		Seq:     le.Uint64(b[16:]),
		Entries: int(le.Uint32(b[24:])),
		Blocks:  int(le.Uint32(b[28:])),
	}
	if ri.Blocks < 1 || ri.Blocks > 1<<20 || ri.Entries > EntriesPerRecord(ri.Blocks) || RecordBlocks(ri.Entries) != ri.Blocks {
		return RecordInfo{}, false
	}
	return ri, true
}

// DecodeJournalRecord checks a whole record (all its blocks) and returns
// its entries. An error means a torn or foreign record: replay stops there.
func DecodeJournalRecord(b []byte) (RecordInfo, []JournalEntry, error) {
	ri, ok := PeekJournalRecord(b)
	if !ok || len(b) < ri.Blocks*BlockSize {
		return ri, nil, fmt.Errorf("%w journal record: bad header", ErrCorrupt)
	}
	b = b[:ri.Blocks*BlockSize]
	le := binary.LittleEndian
	if le.Uint32(b[32:]) != crc(b[:32], b[36:]) {
		return ri, nil, fmt.Errorf("%w journal record %d: checksum", ErrCorrupt, ri.Seq)
	}
	out := make([]JournalEntry, ri.Entries)
	off := recordHeaderSize
	for i := range out {
		out[i] = JournalEntry{Block: le.Uint64(b[off:]), Value: le.Uint32(b[off+8:])}
		off += journalEntrySize
	}
	return ri, out, nil
}
