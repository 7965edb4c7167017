package volume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tdeshim/tdeshim/crypto"
	"github.com/tdeshim/tdeshim/internal/bufpool"
	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

const (
	blockSize = layout.BlockSize
	// trimmedFlag marks an in-memory entry that is FREE for readers but
	// whose FREE state is not yet durable; the low bits keep the slot the
	// disk may still record.
	trimmedFlag = 1 << 31
	slotMask    = trimmedFlag - 1

	stripeShift = 4    // 16 blocks (64 KiB) per lock stripe
	stripes     = 1024 // power of two
)

// Errors the I/O methods return; nbd maps them to protocol error codes.
var (
	ErrRange    = errors.New("volume: request beyond the end of the volume")
	ErrAlign    = errors.New("volume: request not aligned to 512 bytes")
	ErrReadOnly = errors.New("volume: opened read-only")
	ErrFailed   = errors.New("volume: a sync of the backing store failed; refusing writes until restart (data written since the last successful flush may be lost)")
)

// Options for Open.
type Options struct {
	ReadOnly bool
	// Provider unwraps the data keys. Nil means: open the one the header
	// names.
	Provider keys.Provider
	Logger   *slog.Logger
}

// Volume is an open volume. All I/O methods are safe for concurrent use.
type Volume struct {
	st       store.Store
	hdr      *layout.Header
	geo      layout.Geometry
	readOnly bool
	log      *slog.Logger

	// Principal keys: the header's table, and an open provider for every
	// entry some slot uses. Guarded by slotsMu.
	principals keys.Principals
	provs      map[uint16]keys.Provider

	slotsMu sync.Mutex
	slots   []layout.Slot                   // key table, by slot number
	ciphers atomic.Pointer[[]crypto.Cipher] // by slot number; nil if not unwrapped
	rawKeys []*keys.Secret                  // unwrapped data keys (locked memory), for rewrapping

	entries []atomic.Uint32 // in-memory key map (current, not durable)
	stripe  [stripes]sync.RWMutex

	// gate: every data operation holds it shared while it writes data and
	// updates entries; a commit holds it exclusively for the instant it
	// captures the dirty entries (and for a whole checkpoint).
	gate    sync.RWMutex
	dirtyMu sync.Mutex
	dirty   map[uint64]struct{}

	commitMu     sync.Mutex
	flushTicket  atomic.Uint64
	flushedUpTo  uint64 // under commitMu
	epoch        uint64
	nextSeq      uint64
	journalUsed  uint32
	touchedPages map[uint64]struct{}

	failed    atomic.Bool
	closed    atomic.Bool
	suspended atomic.Bool

	// keyFor picks the slot for a write to a FREE block. Issue: per-relation
	// keys replace it with the block index's owner; never blocks.
	keyFor func(block uint64) uint32

	stats Stats
}

// Stats counts work since open.
type Stats struct {
	Commits     atomic.Uint64
	Checkpoints atomic.Uint64
	JournalRecs atomic.Uint64
	Punched     atomic.Uint64 // blocks
}

// Header returns a copy of the current header.
func (v *Volume) Header() layout.Header { return *v.hdr }

// Size is the logical size in bytes.
func (v *Volume) Size() int64 { return int64(v.geo.Size) }

// ReadOnly reports whether the volume was opened read-only.
func (v *Volume) ReadOnly() bool { return v.readOnly }

// Engine names the cipher engine in use.
func (v *Volume) Engine() string {
	cs := *v.ciphers.Load()
	if c := cs[v.hdr.VolumeKeySlot]; c != nil {
		return c.Engine()
	}
	return ""
}

func (v *Volume) cipherFor(slot uint32) (crypto.Cipher, error) {
	cs := *v.ciphers.Load()
	if int(slot) >= len(cs) || cs[slot] == nil {
		return nil, fmt.Errorf("volume %x: key slot %d is not open", v.hdr.UUID[:4], slot)
	}
	return cs[slot], nil
}

// stripesFor returns the sorted stripe indices covering blocks [b0, b1).
func stripesFor(b0, b1 uint64) []int {
	first, last := b0>>stripeShift, (b1-1)>>stripeShift
	n := last - first + 1
	if n >= stripes {
		all := make([]int, stripes)
		for i := range all {
			all[i] = i
		}
		return all
	}
	out := make([]int, 0, n)
	for s := first; s <= last; s++ {
		out = append(out, int(s&(stripes-1)))
	}
	sort.Ints(out)
	return out
}

func (v *Volume) lockStripes(b0, b1 uint64, write bool) func() {
	ss := stripesFor(b0, b1)
	for _, s := range ss {
		if write {
			v.stripe[s].Lock()
		} else {
			v.stripe[s].RLock()
		}
	}
	return func() {
		for i := len(ss) - 1; i >= 0; i-- {
			if write {
				v.stripe[ss[i]].Unlock()
			} else {
				v.stripe[ss[i]].RUnlock()
			}
		}
	}
}

func (v *Volume) checkRange(off, n int64) error {
	if off < 0 || n < 0 || uint64(off)+uint64(n) > v.geo.Size {
		return fmt.Errorf("%w: [%d, +%d) of %d", ErrRange, off, n, v.geo.Size)
	}
	if off%512 != 0 || n%512 != 0 {
		return fmt.Errorf("%w: [%d, +%d)", ErrAlign, off, n)
	}
	return nil
}

// ReadAt fills p from off. FREE blocks read as zeros without decryption.
func (v *Volume) ReadAt(p []byte, off int64) error {
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	b0 := uint64(off) / blockSize
	b1 := (uint64(off) + uint64(len(p)) + blockSize - 1) / blockSize
	v.gate.RLock()
	defer v.gate.RUnlock()
	if v.suspended.Load() {
		return ErrSuspended
	}
	unlock := v.lockStripes(b0, b1, false)
	defer unlock()
	if off%blockSize == 0 && len(p)%blockSize == 0 {
		return v.readBlocks(p, b0)
	}
	buf := bufpool.Get(int(b1-b0) * blockSize)
	defer bufpool.Put(buf)
	if err := v.readBlocks(buf, b0); err != nil {
		return err
	}
	copy(p, buf[uint64(off)-b0*blockSize:])
	return nil
}

// readBlocks decrypts whole blocks starting at b0 into p. Caller holds the
// stripes.
func (v *Volume) readBlocks(p []byte, b0 uint64) error {
	n := uint64(len(p) / blockSize)
	for i := uint64(0); i < n; {
		e := v.entries[b0+i].Load()
		if e == layout.FreeEntry || e&trimmedFlag != 0 {
			j := i + 1
			for j < n {
				if f := v.entries[b0+j].Load(); f != layout.FreeEntry && f&trimmedFlag == 0 {
					break
				}
				j++
			}
			clear(p[i*blockSize : j*blockSize])
			i = j
			continue
		}
		// A run of allocated blocks: one pread, then decrypt per slot.
		j := i + 1
		for j < n {
			if f := v.entries[b0+j].Load(); f == layout.FreeEntry || f&trimmedFlag != 0 {
				break
			}
			j++
		}
		seg := p[i*blockSize : j*blockSize]
		if _, err := v.st.ReadAt(seg, v.geo.BlockOff(b0+i)); err != nil {
			return fmt.Errorf("volume: read blocks %d..%d: %w", b0+i, b0+j-1, err)
		}
		for k := i; k < j; {
			s := v.entries[b0+k].Load()
			m := k + 1
			for m < j && v.entries[b0+m].Load() == s {
				m++
			}
			c, err := v.cipherFor(s)
			if err != nil {
				return fmt.Errorf("volume: block %d: %w", b0+k, err)
			}
			part := p[k*blockSize : m*blockSize]
			c.DecryptBlocks(part, part, b0+k)
			k = m
		}
		i = j
	}
	return nil
}

// WriteAt stores p at off; with fua the data (and its key-map entries) are
// durable when it returns. Writes of less than a block read, modify and
// write the block.
func (v *Volume) WriteAt(p []byte, off int64, fua bool) error {
	if err := v.writable(); err != nil {
		return err
	}
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	b0 := uint64(off) / blockSize
	b1 := (uint64(off) + uint64(len(p)) + blockSize - 1) / blockSize
	err := func() error {
		v.gate.RLock()
		defer v.gate.RUnlock()
		if v.suspended.Load() {
			return ErrSuspended
		}
		unlock := v.lockStripes(b0, b1, true)
		defer unlock()
		head := uint64(off) - b0*blockSize
		if head == 0 && len(p)%blockSize == 0 {
			return v.writeBlocks(p, b0) // whole blocks: no staging copy
		}
		buf := bufpool.Get(int(b1-b0) * blockSize)
		defer bufpool.Put(buf)
		if head != 0 {
			if err := v.readBlocks(buf[:blockSize], b0); err != nil {
				return err
			}
		}
		if end := head + uint64(len(p)); end%blockSize != 0 && (b1-b0 > 1 || head == 0) {
			last := (b1 - b0 - 1) * blockSize
			if err := v.readBlocks(buf[last:last+blockSize], b1-1); err != nil {
				return err
			}
		}
		copy(buf[head:], p)
		return v.writeBlocks(buf[:(b1-b0)*blockSize], b0)
	}()
	if err != nil {
		return err
	}
	if fua {
		return v.Flush()
	}
	return nil
}

// writeBlocks encrypts and stores whole blocks at b0. Caller holds the gate
// (shared) and the stripes (exclusive). A FREE block takes its owner's key
// (keyFor); a trimmed block whose FREE state is not yet durable takes back
// the slot it had; a live block keeps its slot.
func (v *Volume) writeBlocks(plain []byte, b0 uint64) error {
	n := uint64(len(plain) / blockSize)
	slots := make([]uint32, n)
	changed := false
	for i := range slots {
		e := v.entries[b0+uint64(i)].Load()
		switch {
		case e == layout.FreeEntry:
			slots[i] = v.keyFor(b0 + uint64(i))
			changed = true
		case e&trimmedFlag != 0:
			slots[i] = e & slotMask
			changed = true
		default:
			slots[i] = e
		}
	}
	ct := bufpool.Get(len(plain))
	defer bufpool.Put(ct)
	for k := uint64(0); k < n; {
		m := k + 1
		for m < n && slots[m] == slots[k] {
			m++
		}
		c, err := v.cipherFor(slots[k])
		if err != nil {
			return err
		}
		c.EncryptBlocks(ct[k*blockSize:m*blockSize], plain[k*blockSize:m*blockSize], b0+k)
		k = m
	}
	if _, err := v.st.WriteAt(ct[:len(plain)], v.geo.BlockOff(b0)); err != nil {
		return fmt.Errorf("volume: write blocks %d..%d: %w", b0, b0+n-1, err)
	}
	if !changed {
		return nil
	}
	v.dirtyMu.Lock()
	for i, s := range slots {
		b := b0 + uint64(i)
		if v.entries[b].Load() != s {
			v.entries[b].Store(s)
			v.dirty[b] = struct{}{}
		}
	}
	v.dirtyMu.Unlock()
	return nil
}

// Trim frees the whole blocks inside [off, off+n): they read as zeros at
// once, and their space is deallocated after the next commit. Partial
// blocks at the edges are left as they are (TRIM is advisory).
func (v *Volume) Trim(off int64, n int64, fua bool) error {
	if err := v.writable(); err != nil {
		return err
	}
	if off < 0 || n < 0 || uint64(off)+uint64(n) > v.geo.Size {
		return fmt.Errorf("%w: trim [%d, +%d)", ErrRange, off, n)
	}
	b0 := (uint64(off) + blockSize - 1) / blockSize
	b1 := (uint64(off) + uint64(n)) / blockSize
	if b0 < b1 {
		v.gate.RLock()
		unlock := v.lockStripes(b0, b1, true)
		v.dirtyMu.Lock()
		for b := b0; b < b1; b++ {
			e := v.entries[b].Load()
			if e == layout.FreeEntry || e&trimmedFlag != 0 {
				continue
			}
			v.entries[b].Store(e | trimmedFlag)
			v.dirty[b] = struct{}{}
		}
		v.dirtyMu.Unlock()
		unlock()
		v.gate.RUnlock()
	}
	if fua {
		return v.Flush()
	}
	return nil
}

// ErrNotFast is returned by Zero when FAST_ZERO was asked but the zeroing
// needs data writes.
var ErrNotFast = errors.New("volume: zeroing would not be faster than writing")

// Zero makes [off, off+n) read as zeros. Whole blocks become FREE, unless
// noHole asks for allocated zeros, in which case encrypted zeros are
// written. Partial edge blocks are read, zeroed and written.
func (v *Volume) Zero(off int64, n int64, noHole, fast, fua bool) error {
	if err := v.writable(); err != nil {
		return err
	}
	if err := v.checkRange(off, n); err != nil {
		return err
	}
	if noHole && fast {
		return ErrNotFast
	}
	end := off + n
	in0 := (off + blockSize - 1) / blockSize * blockSize
	in1 := end / blockSize * blockSize
	if in0 >= in1 { // no whole block inside
		return v.writeZeros(off, n, fua)
	}
	if off < in0 {
		if err := v.writeZeros(off, in0-off, false); err != nil {
			return err
		}
	}
	if in1 < end {
		if err := v.writeZeros(in1, end-in1, false); err != nil {
			return err
		}
	}
	if noHole {
		for o := in0; o < in1; o += maxZeroChunk {
			c := min(maxZeroChunk, in1-o)
			if err := v.writeZeros(o, c, false); err != nil {
				return err
			}
		}
		if fua {
			return v.Flush()
		}
		return nil
	}
	return v.Trim(in0, in1-in0, fua)
}

const maxZeroChunk = 4 << 20

func (v *Volume) writeZeros(off, n int64, fua bool) error {
	z := bufpool.Get(int(n))
	defer bufpool.Put(z)
	clear(z[:n])
	return v.WriteAt(z[:n], off, fua)
}

// Extent is a run of blocks with the same allocation state.
type Extent struct {
	Length uint64
	Free   bool // reads as zeros, holds no data (a hole)
}

// Status describes [off, off+n) as extents, at most max of them.
func (v *Volume) Status(off int64, n int64, max int) ([]Extent, error) {
	if off < 0 || n <= 0 || uint64(off)+uint64(n) > v.geo.Size {
		return nil, fmt.Errorf("%w: status [%d, +%d)", ErrRange, off, n)
	}
	var out []Extent
	pos, end := uint64(off), uint64(off)+uint64(n)
	for pos < end && len(out) < max {
		b := pos / blockSize
		free := v.isFree(b)
		next := (b + 1) * blockSize
		for next < end && v.isFree(next/blockSize) == free {
			next += blockSize
		}
		next = min(next, end)
		out = append(out, Extent{Length: next - pos, Free: free})
		pos = next
	}
	return out, nil
}

func (v *Volume) isFree(b uint64) bool {
	e := v.entries[b].Load()
	return e == layout.FreeEntry || e&trimmedFlag != 0
}

func (v *Volume) writable() error {
	switch {
	case v.readOnly:
		return ErrReadOnly
	case v.failed.Load():
		return ErrFailed
	case v.closed.Load():
		return store.ErrClosed
	}
	return nil
}

// IsNoSpace reports whether err is the backing store being full.
func IsNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, syscall.EFBIG)
}

// Usage counts blocks by key slot; slot 0 is FREE.
func (v *Volume) Usage() map[uint32]uint64 {
	u := map[uint32]uint64{}
	for i := range v.entries {
		e := v.entries[i].Load()
		if e&trimmedFlag != 0 {
			e = 0
		}
		u[e]++
	}
	return u
}

// Slots returns a copy of the key table.
func (v *Volume) Slots() []layout.Slot {
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	return append([]layout.Slot(nil), v.slots...)
}

// Check asks every principal key in use whether it is still usable.
func (v *Volume) Check(ctx context.Context) error {
	v.slotsMu.Lock()
	provs := make([]keys.Provider, 0, len(v.provs))
	for _, p := range v.provs {
		provs = append(provs, p)
	}
	v.slotsMu.Unlock()
	for _, p := range provs {
		if err := p.Check(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Provider is the provider of the current principal key.
func (v *Volume) Provider() keys.Provider {
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	return v.provs[v.principals.Current]
}

// Principals returns the header's principal-key table.
func (v *Volume) Principals() keys.Principals {
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	return v.principals
}

// StatsSnapshot returns counters since open.
func (v *Volume) StatsSnapshot() map[string]uint64 {
	return map[string]uint64{
		"commits":         v.stats.Commits.Load(),
		"checkpoints":     v.stats.Checkpoints.Load(),
		"journal_records": v.stats.JournalRecs.Load(),
		"punched_blocks":  v.stats.Punched.Load(),
	}
}

func now() int64 { return time.Now().Unix() }
