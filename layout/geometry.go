package layout

import (
	"fmt"
)

// Format constants. Changing any of them is a format version change.
const (
	BlockSize      = 4096 // volume block, XTS data unit, key-map granule
	HeaderCopies   = 2    // header copies at blocks 0 and 1
	SlotSize       = 256  // bytes per key-table slot
	SlotsPerBlock  = BlockSize / SlotSize
	EntrySize      = 4                           // bytes per key-map entry
	EntriesPerPage = (BlockSize - 4) / EntrySize // 1023; the last 4 bytes are the CRC
	DataAlign      = 1 << 20                     // data area starts on a MiB boundary

	// MaxSlots bounds the key table (and the width of a key-map entry).
	MaxSlots = 1 << 24
	// FreeEntry is the key-map value of a block that holds no data.
	FreeEntry = 0
)

// Geometry is where each region of a volume lives. It is derived from the
// volume size, slot count and journal size alone, and the header records it
// so a reader can check the two agree.
type Geometry struct {
	Size          uint64 // logical bytes, a multiple of BlockSize
	Slots         uint32 // key-table slots, slot 0 unused (0 means FREE)
	JournalBlocks uint32 // journal superblock + records
}

// Blocks is the number of logical blocks.
func (g Geometry) Blocks() uint64 { return g.Size / BlockSize }

// KeyTableOff is the byte offset of the key table (right after the headers).
func (g Geometry) KeyTableOff() int64 { return HeaderCopies * BlockSize }

// KeyTableBlocks is the length of the key table in blocks.
func (g Geometry) KeyTableBlocks() uint64 {
	return (uint64(g.Slots) + SlotsPerBlock - 1) / SlotsPerBlock
}

// SlotOff is the byte offset of slot s.
func (g Geometry) SlotOff(s uint32) int64 { return g.KeyTableOff() + int64(s)*SlotSize }

// JournalOff is the byte offset of the journal superblock.
func (g Geometry) JournalOff() int64 {
	return g.KeyTableOff() + int64(g.KeyTableBlocks())*BlockSize
}

// JournalRecordOff is the byte offset of journal record block j (j >= 0),
// counted from the block after the superblock.
func (g Geometry) JournalRecordOff(j uint32) int64 {
	return g.JournalOff() + int64(1+j)*BlockSize
}

// JournalRecordBlocks is the room for records, in blocks.
func (g Geometry) JournalRecordBlocks() uint32 { return g.JournalBlocks - 1 }

// MapPages is the number of key-map pages.
func (g Geometry) MapPages() uint64 {
	return (g.Blocks() + EntriesPerPage - 1) / EntriesPerPage
}

// MapOff is the byte offset of key-map page 0.
func (g Geometry) MapOff() int64 { return g.JournalOff() + int64(g.JournalBlocks)*BlockSize }

// MapPageOff is the byte offset of key-map page p.
func (g Geometry) MapPageOff(p uint64) int64 { return g.MapOff() + int64(p)*BlockSize }

// PageOfBlock is the key-map page holding block b's entry.
func PageOfBlock(b uint64) uint64 { return b / EntriesPerPage }

// DataOff is the byte offset of logical block 0, aligned to DataAlign.
func (g Geometry) DataOff() int64 {
	end := g.MapOff() + int64(g.MapPages())*BlockSize
	return (end + DataAlign - 1) / DataAlign * DataAlign
}

// BlockOff is the backing offset of logical block b.
func (g Geometry) BlockOff(b uint64) int64 { return g.DataOff() + int64(b)*BlockSize }

// BackingSize is the number of backing bytes the volume needs.
func (g Geometry) BackingSize() int64 { return g.DataOff() + int64(g.Size) }

// Validate rejects geometries the format cannot hold.
func (g Geometry) Validate() error {
	switch {
	case g.Size == 0 || g.Size%BlockSize != 0:
		return fmt.Errorf("layout: size %d is not a positive multiple of %d", g.Size, BlockSize)
	case g.Size > 1<<50:
		return fmt.Errorf("layout: size %d exceeds 1 PiB", g.Size)
	case g.Slots < 2 || g.Slots > MaxSlots:
		return fmt.Errorf("layout: %d key slots, want 2..%d", g.Slots, MaxSlots)
	case g.JournalBlocks < 4 || g.JournalBlocks > 1<<20:
		return fmt.Errorf("layout: %d journal blocks, want 4..%d", g.JournalBlocks, 1<<20)
	}
	return nil
}

// DefaultGeometry picks slot and journal sizes for a volume of size bytes:
// room for a key per relation of a large cluster, and a journal big enough
// that checkpoints are rare but replay stays quick.
func DefaultGeometry(size uint64) Geometry {
	slots := uint32(65536)
	if size < 1<<30 {
		slots = 4096
	}
	journal := uint32(1024) // 4 MiB: ~340k key-map changes between checkpoints
	if size < 256<<20 {
		journal = 64
	}
	return Geometry{Size: size, Slots: slots, JournalBlocks: journal}
}
