package layout

import (
	"encoding/binary"
	"fmt"
)

// EncodeMapPage writes key-map page p from entries (at most EntriesPerPage;
// missing entries are FREE).
func EncodeMapPage(p uint64, entries []uint32) []byte {
	b := make([]byte, BlockSize)
	le := binary.LittleEndian
	for i, e := range entries {
		le.PutUint32(b[i*EntrySize:], e)
	}
	le.PutUint32(b[BlockSize-4:], mapChecksum(p, b))
	return b
}

func mapChecksum(p uint64, b []byte) uint32 {
	var num [8]byte
	binary.LittleEndian.PutUint64(num[:], p)
	return crc(num[:], b[:BlockSize-4])
}

// DecodeMapPage fills entries (len <= EntriesPerPage) from page p and checks
// its checksum. A page that was never written (all zeros) is all FREE.
// On a checksum error entries are still filled, so journal replay can
// repair a page torn during a checkpoint.
func DecodeMapPage(p uint64, b []byte, entries []uint32) error {
	if len(b) < BlockSize || len(entries) > EntriesPerPage {
		return fmt.Errorf("%w key-map page %d: bad buffer", ErrCorrupt, p)
	}
	le := binary.LittleEndian
	zero := true
	for i := range entries {
		entries[i] = le.Uint32(b[i*EntrySize:])
	}
	for _, c := range b[:BlockSize] {
		if c != 0 {
			zero = false
			break
		}
	}
	if zero {
		return nil
	}
	if got, want := le.Uint32(b[BlockSize-4:]), mapChecksum(p, b); got != want {
		return fmt.Errorf("%w key-map page %d: checksum %08x, want %08x", ErrCorrupt, p, got, want)
	}
	return nil
}
