package layout

import (
	"encoding/binary"
	"fmt"
)

// Slot states.
const (
	SlotEmpty     = 0
	SlotActive    = 1
	SlotDestroyed = 2 // key material overwritten: crypto-shredded
	// SlotRetiring: the key still decrypts blocks, but no new block takes
	// it; the rekeyer moves its blocks to their owners' keys, then it is
	// destroyed. Rotation and crypto-shredding both go through it.
	SlotRetiring = 3
)

// Slot kinds: what a data key encrypts.
const (
	KindVolume   = 1
	KindWAL      = 2
	KindRelation = 3
)

// Wrapped-key sizes: AES-256-GCM over a 64-byte XTS key.
const (
	NonceSize      = 12
	WrappedKeySize = 64
	TagSize        = 16
)

// Slot is one key-table entry: a wrapped data key and what it encrypts.
type Slot struct {
	State      uint8
	Kind       uint8
	Principal  uint16 // which principal key wraps it; 0 = the volume's
	Tablespace uint32 // relation owner, for KindRelation
	Database   uint32
	RelNode    uint32
	Created    int64
	Generation uint64 // bumped on every rewrap
	Nonce      [NonceSize]byte
	Ciphertext [WrappedKeySize]byte
	Tag        [TagSize]byte
}

// HasKey reports whether the slot holds usable key material (active or
// retiring).
func (s *Slot) HasKey() bool { return s.State == SlotActive || s.State == SlotRetiring }

// Rel is the relation a KindRelation slot belongs to.
func (s *Slot) Rel() RelKey {
	return RelKey{Tablespace: s.Tablespace, Database: s.Database, RelNode: s.RelNode}
}

const slotCRC = SlotSize - 4

// EncodeSlot encodes slot number n (the number is covered by the checksum,
// so a slot copied to the wrong place is detected).
func EncodeSlot(n uint32, s *Slot) []byte {
	b := make([]byte, SlotSize)
	le := binary.LittleEndian
	b[0], b[1] = s.State, s.Kind
	le.PutUint16(b[2:], s.Principal)
	le.PutUint32(b[4:], s.Tablespace)
	le.PutUint32(b[8:], s.Database)
	le.PutUint32(b[12:], s.RelNode)
	le.PutUint64(b[16:], uint64(s.Created))
	le.PutUint64(b[24:], s.Generation)
	copy(b[32:44], s.Nonce[:])
	copy(b[44:108], s.Ciphertext[:])
	copy(b[108:124], s.Tag[:])
	le.PutUint32(b[slotCRC:], slotChecksum(n, b))
	return b
}

func slotChecksum(n uint32, b []byte) uint32 {
	var num [4]byte
	binary.LittleEndian.PutUint32(num[:], n)
	return crc(num[:], b[:slotCRC])
}

// DecodeSlot parses slot number n. An all-zero entry is an empty slot.
func DecodeSlot(n uint32, b []byte) (*Slot, error) {
	if len(b) < SlotSize {
		return nil, fmt.Errorf("%w slot %d: %d bytes", ErrCorrupt, n, len(b))
	}
	b = b[:SlotSize]
	allZero := true
	for _, c := range b {
		if c != 0 {
			allZero = false
			break
		}
	}
	if allZero {
		return &Slot{State: SlotEmpty}, nil
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(b[slotCRC:]), slotChecksum(n, b); got != want {
		return nil, fmt.Errorf("%w slot %d: checksum %08x, want %08x", ErrCorrupt, n, got, want)
	}
	s := &Slot{
		State:      b[0],
		Kind:       b[1],
		Principal:  le.Uint16(b[2:]),
		Tablespace: le.Uint32(b[4:]),
		Database:   le.Uint32(b[8:]),
		RelNode:    le.Uint32(b[12:]),
		Created:    int64(le.Uint64(b[16:])),
		Generation: le.Uint64(b[24:]),
	}
	if s.State > SlotRetiring || s.Kind < KindVolume || s.Kind > KindRelation {
		return nil, fmt.Errorf("%w slot %d: state %d kind %d", ErrCorrupt, n, s.State, s.Kind)
	}
	copy(s.Nonce[:], b[32:44])
	copy(s.Ciphertext[:], b[44:108])
	copy(s.Tag[:], b[108:124])
	return s, nil
}

// WrapAAD is the additional data that binds a wrapped key to its volume
// and slot: a wrapped key moved to another slot or volume fails to unwrap.
func WrapAAD(uuid [16]byte, slot uint32) []byte {
	aad := make([]byte, 0, 40)
	aad = append(aad, "tdeshim data key v1\x00"...)
	aad = append(aad, uuid[:]...)
	return binary.LittleEndian.AppendUint32(aad, slot)
}
