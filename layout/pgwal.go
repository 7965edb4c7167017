package layout

import "encoding/binary"

// WAL pages identify themselves: every XLOG_BLCKSZ (8 KiB) page of a WAL
// segment starts with XLogPageHeaderData — magic (u16), info flags (u16),
// timeline (u32), page address (u64), … — in the server's byte order
// (little-endian on every platform we serve). The I/O path uses this to
// give a write the WAL key before the watcher has mapped a new segment.

// WALPageSize is PostgreSQL's XLOG_BLCKSZ (the default build).
const WALPageSize = 8192

// walMagics are XLOG_PAGE_MAGIC of PostgreSQL 13 to 18.
var walMagics = map[uint16]bool{0xD106: true, 0xD10D: true, 0xD110: true, 0xD113: true, 0xD116: true, 0xD118: true}

const walInfoMask = 0x000F // XLP_ALL_FLAGS

// IsWALPageHeader reports whether b begins with a plausible WAL page
// header: a known magic, only defined info bits, a timeline and a page
// address aligned to a WAL page.
func IsWALPageHeader(b []byte) bool {
	if len(b) < 24 {
		return false
	}
	le := binary.LittleEndian
	if !walMagics[le.Uint16(b)] || le.Uint16(b[2:])&^walInfoMask != 0 {
		return false
	}
	tli, addr := le.Uint32(b[4:]), le.Uint64(b[8:])
	return tli != 0 && addr%WALPageSize == 0
}
