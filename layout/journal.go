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
	rekeyRecordMagic   = [8]byte{'T', 'D', 'J', 'R', 'K', 'E', 'Y', 0}
)

// Record kinds.
const (
	RecordMap   = 1 // key-map entries
	RecordRekey = 2 // blocks re-encrypted under another key, with their new ciphertext
)

const (
	recordHeaderSize = 40
	journalEntrySize = 12 // block u64, value u32
	rekeyEntrySize   = 16 // block u64, from u32, to u32
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

// EncodeJournalSuper encodes the superblock for epoch. Everything that
// matters is in its first 512-byte sector with its own checksum (bytes
// 16..20), so a write torn between sectors still decodes; the whole-block
// checksum at the end is kept for volumes written before the sector one.
func EncodeJournalSuper(epoch uint64) []byte {
	b := make([]byte, BlockSize)
	copy(b, journalSuperMagic[:])
	binary.LittleEndian.PutUint64(b[8:], epoch)
	binary.LittleEndian.PutUint32(b[16:], crc(b[:16]))
	binary.LittleEndian.PutUint32(b[BlockSize-4:], crc(b[:BlockSize-4]))
	return b
}

// DecodeJournalSuper returns the epoch in a superblock.
func DecodeJournalSuper(b []byte) (uint64, error) {
	if len(b) < BlockSize || !bytes.Equal(b[:8], journalSuperMagic[:]) {
		return 0, fmt.Errorf("%w journal superblock: bad magic", ErrCorrupt)
	}
	le := binary.LittleEndian
	if le.Uint32(b[16:]) != crc(b[:16]) && le.Uint32(b[BlockSize-4:]) != crc(b[:BlockSize-4]) {
		return 0, fmt.Errorf("%w journal superblock: checksum", ErrCorrupt)
	}
	return le.Uint64(b[8:]), nil
}

// EncodeJournalRecord encodes one record; its length is a whole number of
// blocks.
func EncodeJournalRecord(epoch, seq uint64, entries []JournalEntry) []byte {
	b := newRecord(journalRecordMagic, epoch, seq, len(entries), RecordBlocks(len(entries)))
	le := binary.LittleEndian
	off := recordHeaderSize
	for _, e := range entries {
		le.PutUint64(b[off:], e.Block)
		le.PutUint32(b[off+8:], e.Value)
		off += journalEntrySize
	}
	sealRecord(b)
	return b
}

// newRecord allocates a record of nblocks blocks and fills the header both
// kinds share: magic, epoch, sequence, entry count, length.
func newRecord(magic [8]byte, epoch, seq uint64, n, nblocks int) []byte {
	b := make([]byte, nblocks*BlockSize)
	le := binary.LittleEndian
	copy(b, magic[:])
	le.PutUint64(b[8:], epoch)
	le.PutUint64(b[16:], seq)
	le.PutUint32(b[24:], uint32(n))
	le.PutUint32(b[28:], uint32(nblocks))
	return b
}

// sealRecord writes a finished record's checksum.
func sealRecord(b []byte) {
	binary.LittleEndian.PutUint32(b[32:], crc(b[:32], b[36:]))
}

// openRecord checks that b holds a whole record of kind (header, length,
// checksum) and returns it cut to its length.
func openRecord(b []byte, kind int) (RecordInfo, []byte, error) {
	ri, ok := PeekJournalRecord(b)
	if !ok || ri.Kind != kind || len(b) < ri.Blocks*BlockSize {
		return ri, nil, fmt.Errorf("%w journal record: bad header", ErrCorrupt)
	}
	b = b[:ri.Blocks*BlockSize]
	if binary.LittleEndian.Uint32(b[32:]) != crc(b[:32], b[36:]) {
		return ri, nil, fmt.Errorf("%w journal record %d: checksum", ErrCorrupt, ri.Seq)
	}
	return ri, b, nil
}

// RecordInfo is what the first block of a record says about it.
type RecordInfo struct {
	Kind       int // RecordMap or RecordRekey
	Epoch, Seq uint64
	Entries    int
	Blocks     int
}

// PeekJournalRecord reads the header in a record's first block, so the
// caller knows how many blocks to read. ok is false for anything that is
// not a record header (the end of the journal).
func PeekJournalRecord(b []byte) (RecordInfo, bool) {
	if len(b) < recordHeaderSize {
		return RecordInfo{}, false
	}
	kind := 0
	switch {
	case bytes.Equal(b[:8], journalRecordMagic[:]):
		kind = RecordMap
	case bytes.Equal(b[:8], rekeyRecordMagic[:]):
		kind = RecordRekey
	default:
		return RecordInfo{}, false
	}
	le := binary.LittleEndian
	ri := RecordInfo{
		Kind:    kind,
		Epoch:   le.Uint64(b[8:]),
		Seq:     le.Uint64(b[16:]),
		Entries: int(le.Uint32(b[24:])),
		Blocks:  int(le.Uint32(b[28:])),
	}
	if ri.Blocks < 1 || ri.Blocks > 1<<20 || ri.Entries > 1<<20 {
		return RecordInfo{}, false
	}
	switch kind {
	case RecordMap:
		if ri.Entries > EntriesPerRecord(ri.Blocks) || RecordBlocks(ri.Entries) != ri.Blocks {
			return RecordInfo{}, false
		}
	case RecordRekey:
		if ri.Entries < 1 || RekeyRecordBlocks(ri.Entries) != ri.Blocks {
			return RecordInfo{}, false
		}
	}
	return ri, true
}

// DecodeJournalRecord checks a whole record (all its blocks) and returns
// its entries. An error means a torn or foreign record: replay stops there.
func DecodeJournalRecord(b []byte) (RecordInfo, []JournalEntry, error) {
	ri, b, err := openRecord(b, RecordMap)
	if err != nil {
		return ri, nil, err
	}
	le := binary.LittleEndian
	out := make([]JournalEntry, ri.Entries)
	off := recordHeaderSize
	for i := range out {
		out[i] = JournalEntry{Block: le.Uint64(b[off:]), Value: le.Uint32(b[off+8:])}
		off += journalEntrySize
	}
	return ri, out, nil
}

// RekeyEntry says that block Block moved from key slot From to key slot To;
// its ciphertext under To travels in the same record.
type RekeyEntry struct {
	Block    uint64
	From, To uint32
}

func rekeyHeaderBlocks(n int) int {
	return (recordHeaderSize + n*rekeyEntrySize + BlockSize - 1) / BlockSize
}

// RekeyRecordBlocks is the length in blocks of a rekey record of n
// entries: header and entry table, then one block of ciphertext per entry.
func RekeyRecordBlocks(n int) int { return rekeyHeaderBlocks(n) + n }

// EncodeRekeyRecord encodes a rekey record; data holds len(entries) blocks
// of ciphertext, in entry order. The rekeyer writes it and syncs before it
// overwrites any block in place, so replay can finish a torn rekey.
func EncodeRekeyRecord(epoch, seq uint64, entries []RekeyEntry, data []byte) []byte {
	if len(data) != len(entries)*BlockSize {
		panic("layout: rekey record data does not match its entries")
	}
	hb := rekeyHeaderBlocks(len(entries))
	b := newRecord(rekeyRecordMagic, epoch, seq, len(entries), hb+len(entries))
	le := binary.LittleEndian
	off := recordHeaderSize
	for _, e := range entries {
		le.PutUint64(b[off:], e.Block)
		le.PutUint32(b[off+8:], e.From)
		le.PutUint32(b[off+12:], e.To)
		off += rekeyEntrySize
	}
	copy(b[hb*BlockSize:], data)
	sealRecord(b)
	return b
}

// DecodeRekeyRecord checks a whole rekey record and returns its entries and
// the ciphertext blocks (a sub-slice of b, in entry order).
func DecodeRekeyRecord(b []byte) (RecordInfo, []RekeyEntry, []byte, error) {
	ri, b, err := openRecord(b, RecordRekey)
	if err != nil {
		return ri, nil, nil, err
	}
	le := binary.LittleEndian
	out := make([]RekeyEntry, ri.Entries)
	off := recordHeaderSize
	for i := range out {
		out[i] = RekeyEntry{Block: le.Uint64(b[off:]), From: le.Uint32(b[off+8:]), To: le.Uint32(b[off+12:])}
		off += rekeyEntrySize
	}
	return ri, out, b[rekeyHeaderBlocks(ri.Entries)*BlockSize:], nil
}
