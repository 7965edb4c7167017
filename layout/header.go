package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// Magic opens both header copies.
var Magic = [8]byte{'T', 'D', 'E', 'S', 'H', 'I', 'M', 0}

// Version is the format version this package reads and writes.
const Version = 1

// CipherAES256XTS is cipher id 1: AES-256-XTS, 4 KiB data units, tweak =
// logical block number, 16 bytes little-endian.
const CipherAES256XTS = 1

// MaxProviderConfig bounds the provider settings stored in the header.
const MaxProviderConfig = 3072

// Header flags.
const (
	FlagClean = 1 << 0 // last close was clean (journal checkpointed)
)

// Header is the volume header, stored twice (blocks 0 and 1). The copy with
// the higher sequence number and a valid checksum wins.
type Header struct {
	Version        uint32
	Flags          uint32
	Seq            uint64
	UUID           [16]byte
	Geometry       Geometry
	Cipher         uint32
	Created        int64 // unix seconds
	LastClean      int64 // unix seconds of the last clean close, 0 if none
	LastOpen       int64
	VolumeKeySlot  uint32
	ProviderConfig []byte // non-secret key-provider settings, JSON
}

// Errors a header decode can return; all wrap ErrCorrupt but the first.
var (
	ErrNotVolume = errors.New("layout: not a tdeshim volume (bad magic)")
	ErrCorrupt   = errors.New("layout: corrupt")
	ErrVersion   = errors.New("layout: unsupported format version")
)

const (
	hdrCRC = BlockSize - 4
)

// EncodeHeader writes h into a BlockSize buffer.
func EncodeHeader(h *Header) ([]byte, error) {
	if len(h.ProviderConfig) > MaxProviderConfig {
		return nil, fmt.Errorf("layout: provider config is %d bytes, max %d", len(h.ProviderConfig), MaxProviderConfig)
	}
	if err := h.Geometry.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, BlockSize)
	le := binary.LittleEndian
	g := h.Geometry
	copy(b[0:8], Magic[:])
	le.PutUint32(b[8:], h.Version)
	le.PutUint32(b[12:], h.Flags)
	le.PutUint64(b[16:], h.Seq)
	copy(b[24:40], h.UUID[:])
	le.PutUint64(b[40:], g.Size)
	le.PutUint32(b[48:], BlockSize)
	le.PutUint32(b[52:], h.Cipher)
	le.PutUint32(b[56:], g.Slots)
	le.PutUint32(b[60:], g.JournalBlocks)
	le.PutUint64(b[64:], uint64(g.KeyTableOff()))
	le.PutUint64(b[72:], uint64(g.JournalOff()))
	le.PutUint64(b[80:], uint64(g.MapOff()))
	le.PutUint64(b[88:], g.MapPages())
	le.PutUint64(b[96:], uint64(g.DataOff()))
	le.PutUint64(b[104:], uint64(h.Created))
	le.PutUint64(b[112:], uint64(h.LastClean))
	le.PutUint64(b[120:], uint64(h.LastOpen))
	le.PutUint32(b[128:], h.VolumeKeySlot)
	le.PutUint32(b[132:], uint32(len(h.ProviderConfig)))
	copy(b[136:], h.ProviderConfig)
	le.PutUint32(b[hdrCRC:], crc(b[:hdrCRC]))
	return b, nil
}

// DecodeHeader parses and checks one header copy.
func DecodeHeader(b []byte) (*Header, error) {
	if len(b) < BlockSize {
		return nil, fmt.Errorf("%w header: %d bytes", ErrCorrupt, len(b))
	}
	if !bytes.Equal(b[0:8], Magic[:]) {
		return nil, ErrNotVolume
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[hdrCRC:]), crc(b[:hdrCRC]); got != want {
		return nil, fmt.Errorf("%w header: checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	h := &Header{
		Version: le.Uint32(b[8:]),
		Flags:   le.Uint32(b[12:]),
		Seq:     le.Uint64(b[16:]),
	}
	if h.Version != Version {
		return nil, fmt.Errorf("%w %d (this build reads %d)", ErrVersion, h.Version, Version)
	}
	copy(h.UUID[:], b[24:40])
	h.Geometry = Geometry{Size: le.Uint64(b[40:]), Slots: le.Uint32(b[56:]), JournalBlocks: le.Uint32(b[60:])}
	g := h.Geometry
	if err := g.Validate(); err != nil {
		return nil, fmt.Errorf("%w header: %v", ErrCorrupt, err)
	}
	if bs := le.Uint32(b[48:]); bs != BlockSize {
		return nil, fmt.Errorf("%w header: block size %d", ErrCorrupt, bs)
	}
	h.Cipher = le.Uint32(b[52:])
	if h.Cipher != CipherAES256XTS {
		return nil, fmt.Errorf("%w header: unknown cipher %d", ErrCorrupt, h.Cipher)
	}
	// The recorded offsets must be the ones the geometry implies.
	if le.Uint64(b[64:]) != uint64(g.KeyTableOff()) || le.Uint64(b[72:]) != uint64(g.JournalOff()) ||
		le.Uint64(b[80:]) != uint64(g.MapOff()) || le.Uint64(b[88:]) != g.MapPages() ||
		le.Uint64(b[96:]) != uint64(g.DataOff()) {
		return nil, fmt.Errorf("%w header: region offsets disagree with geometry", ErrCorrupt)
	}
	h.Created = int64(le.Uint64(b[104:]))
	h.LastClean = int64(le.Uint64(b[112:]))
	h.LastOpen = int64(le.Uint64(b[120:]))
	h.VolumeKeySlot = le.Uint32(b[128:])
	if h.VolumeKeySlot == 0 || h.VolumeKeySlot >= g.Slots {
		return nil, fmt.Errorf("%w header: volume key slot %d", ErrCorrupt, h.VolumeKeySlot)
	}
	n := le.Uint32(b[132:])
	if n > MaxProviderConfig {
		return nil, fmt.Errorf("%w header: provider config length %d", ErrCorrupt, n)
	}
	h.ProviderConfig = append([]byte(nil), b[136:136+n]...)
	return h, nil
}

// PickHeader chooses between the two copies: the valid one with the higher
// sequence. It fails only if neither copy is valid.
func PickHeader(a, b []byte) (*Header, error) {
	ha, ea := DecodeHeader(a)
	hb, eb := DecodeHeader(b)
	switch {
	case ea == nil && eb == nil:
		if hb.Seq > ha.Seq {
			return hb, nil
		}
		return ha, nil
	case ea == nil:
		return ha, nil
	case eb == nil:
		return hb, nil
	case errors.Is(ea, ErrNotVolume) && errors.Is(eb, ErrNotVolume):
		return nil, ErrNotVolume
	case errors.Is(ea, ErrVersion):
		return nil, ea
	default:
		return nil, fmt.Errorf("both header copies are unreadable: %v; %w", ea, eb)
	}
}
