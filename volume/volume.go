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
	// suspendedPrincipals: database principal keys found revoked; the
	// data keys they wrap are wiped. Under slotsMu.
	suspendedPrincipals map[uint16]error

	slotsMu sync.Mutex
	slots   []layout.Slot               // key table, by slot number
	ciphers []atomic.Pointer[cipherRef] // by slot number; nil if not unwrapped
	rawKeys []*keys.Secret              // unwrapped data keys (locked memory), for rewrapping

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

	// Per-relation keying: owners' slots, the watcher's index, and a
	// live-block count per slot (trimmed blocks not counted).
	own    ownerKeys
	index  atomic.Pointer[layout.Index]
	keyMu  sync.Mutex // serialises key creation, retirement, destruction
	counts []atomic.Int64
	// epochSeen mirrors epoch for readers without commitMu.
	epochSeen atomic.Uint64

	rk rekeyState
	// overlay: ciphertext of an unfinished rekey, on read-only opens only.
	overlay map[uint64][]byte

	stats Stats
}

// Stats counts work since open.
type Stats struct {
	Commits     atomic.Uint64
	Checkpoints atomic.Uint64
	JournalRecs atomic.Uint64
	Punched     atomic.Uint64 // blocks

	ClientWritten atomic.Uint64 // bytes written by clients
	ZeroSkipped   atomic.Uint64 // all-zero blocks written to FREE blocks, kept FREE
	KeysCreated   atomic.Uint64
	KeysDestroyed atomic.Uint64
}

// Header returns a copy of the current header.
func (v *Volume) Header() layout.Header { return *v.hdr }

// Size is the logical size in bytes.
func (v *Volume) Size() int64 { return int64(v.geo.Size) }

// ReadOnly reports whether the volume was opened read-only.
func (v *Volume) ReadOnly() bool { return v.readOnly }

// Engine names the cipher engine in use.
func (v *Volume) Engine() string {
	if c := v.ciphers[v.volSlot()].Load(); c != nil {
		return c.Engine()
	}
	return ""
}

// cipherRef boxes a cipher so that each slot's can be swapped atomically.
type cipherRef struct{ crypto.Cipher }

func (v *Volume) cipherFor(slot uint32) (crypto.Cipher, error) {
	if int(slot) >= len(v.ciphers) {
		return nil, fmt.Errorf("volume %x: key slot %d is out of range", v.hdr.UUID[:4], slot)
	}
	c := v.ciphers[slot].Load()
	if c == nil {
		return nil, fmt.Errorf("volume %x: key slot %d is not open (its key is destroyed, or its principal key is unavailable)", v.hdr.UUID[:4], slot)
	}
	return c.Cipher, nil
}

// setCipher installs (or, with nil, removes and closes) slot i's cipher.
func (v *Volume) setCipher(i uint32, c crypto.Cipher) {
	var ref *cipherRef
	if c != nil {
		ref = &cipherRef{c}
	}
	if old := v.ciphers[i].Swap(ref); old != nil {
		old.Close()
	}
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
		for b, ct := range v.overlay {
			if b >= b0+i && b < b0+j {
				copy(seg[(b-b0-i)*blockSize:], ct)
			}
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
	v.stats.ClientWritten.Add(uint64(len(p)))
	return v.writeAt(p, off, fua, true)
}

// writeAt is WriteAt; skipZero lets all-zero blocks that read as zeros
// already stay FREE (false for WRITE_ZEROES with NO_HOLE, which asks for
// allocated zeros).
func (v *Volume) writeAt(p []byte, off int64, fua, skipZero bool) error {
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
			return v.writeBlocks(p, b0, skipZero) // whole blocks: no staging copy
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
		return v.writeBlocks(buf[:(b1-b0)*blockSize], b0, skipZero)
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
// (assignKeys); a trimmed block whose FREE state is not yet durable takes
// back the slot it had; a live block keeps its slot. With skipZero and a
// watcher, an all-zero block that reads as zeros already (FREE or trimmed)
// and whose owner is not known yet stays so: nothing is stored and no key
// is chosen for it, so a file zero-filled before the watcher mapped it
// (a new WAL segment) is not written under the volume key only to be
// rekeyed. Owned zero blocks are stored: PostgreSQL zero-fills to
// allocate, and the writes that follow are then overwrites, which need no
// key-map commit at FLUSH.
func (v *Volume) writeBlocks(plain []byte, b0 uint64, skipZero bool) error {
	n := uint64(len(plain) / blockSize)
	slots := make([]uint32, n)
	var free []bool
	changed := false
	ix := v.index.Load()
	for i := range slots {
		e := v.entries[b0+uint64(i)].Load()
		isFree := e == layout.FreeEntry || e&trimmedFlag != 0
		if isFree && skipZero && ix != nil && isZero(plain[i*blockSize:(i+1)*blockSize]) {
			if _, owned := ix.Lookup(b0 + uint64(i)); !owned {
				slots[i] = skipSlot
				v.stats.ZeroSkipped.Add(1)
				continue
			}
		}
		switch {
		case e == layout.FreeEntry:
			if free == nil {
				free = make([]bool, n)
			}
			free[i] = true
			changed = true
		case e&trimmedFlag != 0:
			slots[i] = e & slotMask
			changed = true
		default:
			slots[i] = e
		}
	}
	if free != nil {
		v.assignKeys(plain, b0, slots, free)
	}
	ct := bufpool.Get(len(plain))
	defer bufpool.Put(ct)
	for k := uint64(0); k < n; {
		m := k + 1
		for m < n && slots[m] == slots[k] {
			m++
		}
		if slots[k] == skipSlot {
			k = m
			continue
		}
		c, err := v.cipherFor(slots[k])
		if err != nil {
			return err
		}
		c.EncryptBlocks(ct[k*blockSize:m*blockSize], plain[k*blockSize:m*blockSize], b0+k)
		k = m
	}
	// One write per run of stored blocks.
	for k := uint64(0); k < n; {
		if slots[k] == skipSlot {
			k++
			continue
		}
		m := k + 1
		for m < n && slots[m] != skipSlot {
			m++
		}
		if _, err := v.st.WriteAt(ct[k*blockSize:m*blockSize], v.geo.BlockOff(b0+k)); err != nil {
			return fmt.Errorf("volume: write blocks %d..%d: %w", b0+k, b0+m-1, err)
		}
		k = m
	}
	if !changed {
		return nil
	}
	v.dirtyMu.Lock()
	for i, s := range slots {
		b := b0 + uint64(i)
		if s == skipSlot {
			continue
		}
		if e := v.entries[b].Load(); e != s {
			v.entries[b].Store(s)
			v.dirty[b] = struct{}{}
			if e == layout.FreeEntry || e&trimmedFlag != 0 {
				v.counts[s].Add(1)
			}
		}
	}
	v.dirtyMu.Unlock()
	v.rk.gen.Add(1)
	return nil
}

// skipSlot marks, in writeBlocks, a block that is not stored.
const skipSlot = ^uint32(0)

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
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
			v.counts[e].Add(-1)
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
	return v.writeAt(z[:n], off, fua, false)
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

// Usage counts blocks by key slot; slot 0 is FREE. It reads the live
// per-slot counts that every key-map change keeps, not the map itself.
func (v *Volume) Usage() map[uint32]uint64 {
	u := map[uint32]uint64{}
	used := uint64(0)
	for s := range v.counts {
		if n := v.counts[s].Load(); n > 0 {
			u[uint32(s)] = uint64(n)
			used += uint64(n)
		}
	}
	if free := v.geo.Blocks() - used; free > 0 {
		u[layout.FreeEntry] = free
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
		"zero_skipped":    v.stats.ZeroSkipped.Load(),
		"client_bytes":    v.stats.ClientWritten.Load(),
		"keys_created":    v.stats.KeysCreated.Load(),
		"keys_destroyed":  v.stats.KeysDestroyed.Load(),
	}
}

func now() int64 { return time.Now().Unix() }
