package volume

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"

	"github.com/tdeshim/tdeshim/crypto"
	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

// Preallocator is implemented by stores that can reserve space, so that
// metadata writes never meet a full disk.
type Preallocator interface {
	Preallocate(off, n int64) error
}

// Zeroer is implemented by stores that can zero a range faster than writing.
type Zeroer interface {
	ZeroRange(off, n int64) error
}

// Progress reports long work (done of total units).
type Progress func(done, total uint64)

// Create lays out a new volume on st: headers, key table with the volume
// key wrapped by prov, an empty journal and an all-FREE key map. The data
// area is not touched: FREE blocks are never decrypted.
func Create(ctx context.Context, st store.Store, geo layout.Geometry, prov keys.Provider, progress Progress) error {
	if err := geo.Validate(); err != nil {
		return err
	}
	if st.Size() < geo.BackingSize() {
		return fmt.Errorf("volume: backing store holds %d bytes, a %d-byte volume needs %d", st.Size(), geo.Size, geo.BackingSize())
	}
	meta := geo.DataOff()
	if err := zeroRange(st, 0, meta, progress); err != nil {
		return fmt.Errorf("volume: clear metadata area: %w", err)
	}
	if p, ok := st.(Preallocator); ok {
		if err := p.Preallocate(0, meta); err != nil {
			return fmt.Errorf("volume: reserve metadata area: %w", err)
		}
	}
	h := &layout.Header{
		Version:       layout.Version,
		Flags:         layout.FlagClean,
		Seq:           1,
		Geometry:      geo,
		Cipher:        layout.CipherAES256XTS,
		Created:       now(),
		VolumeKeySlot: 1,
	}
	if _, err := rand.Read(h.UUID[:]); err != nil {
		return err
	}
	cfg, err := keys.SinglePrincipal(prov.Config()).Marshal()
	if err != nil {
		return err
	}
	h.ProviderConfig = cfg
	vk, err := keys.RandomSecret(crypto.KeySize)
	if err != nil {
		return err
	}
	defer vk.Wipe()
	w, err := prov.Wrap(ctx, vk, layout.WrapAAD(h.UUID, h.VolumeKeySlot))
	if err != nil {
		return fmt.Errorf("volume: wrap volume key: %w", err)
	}
	slot := &layout.Slot{State: layout.SlotActive, Kind: layout.KindVolume, Created: h.Created,
		Nonce: w.Nonce, Ciphertext: w.Ciphertext, Tag: w.Tag}
	if _, err := st.WriteAt(layout.EncodeSlot(h.VolumeKeySlot, slot), geo.SlotOff(h.VolumeKeySlot)); err != nil {
		return err
	}
	// A random first epoch: records of any earlier volume on this device
	// can never be mistaken for ours.
	var e [8]byte
	rand.Read(e[:])
	epoch := uint64(e[0]) | uint64(e[1])<<8 | uint64(e[2])<<16 | uint64(e[3])<<24
	if _, err := st.WriteAt(layout.EncodeJournalSuper(epoch), geo.JournalOff()); err != nil {
		return err
	}
	if err := st.Sync(); err != nil {
		return err
	}
	return writeHeader(st, h)
}

func zeroRange(st store.Store, off, n int64, progress Progress) error {
	if z, ok := st.(Zeroer); ok {
		return z.ZeroRange(off, n)
	}
	const chunk = 1 << 20
	zero := make([]byte, chunk)
	for pos := off; pos < off+n; pos += chunk {
		c := min(chunk, off+n-pos)
		if _, err := st.WriteAt(zero[:c], pos); err != nil {
			return err
		}
		if progress != nil {
			progress(uint64(pos-off+c), uint64(n))
		}
	}
	return nil
}

// writeHeader writes copy 0, syncs, then copy 1, syncs: at every instant
// at least one copy is whole.
func writeHeader(st store.Store, h *layout.Header) error {
	b, err := layout.EncodeHeader(h)
	if err != nil {
		return err
	}
	for c := int64(0); c < layout.HeaderCopies; c++ {
		if _, err := st.WriteAt(b, c*layout.BlockSize); err != nil {
			return fmt.Errorf("volume: write header copy %d: %w", c, err)
		}
		if err := st.Sync(); err != nil {
			return fmt.Errorf("volume: sync header copy %d: %w", c, err)
		}
	}
	return nil
}

// ReadHeader reads and picks the header of st.
func ReadHeader(st store.Store) (*layout.Header, error) {
	if st.Size() < 2*layout.BlockSize {
		return nil, fmt.Errorf("%w: %d bytes is too small", layout.ErrNotVolume, st.Size())
	}
	b := make([]byte, 2*layout.BlockSize)
	if _, err := st.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("volume: read header: %w", err)
	}
	h, err := layout.PickHeader(b[:layout.BlockSize], b[layout.BlockSize:])
	if err != nil {
		return nil, err
	}
	if st.Size() < h.Geometry.BackingSize() {
		return nil, fmt.Errorf("%w: backing store is %d bytes, header says the volume needs %d (truncated copy?)",
			layout.ErrCorrupt, st.Size(), h.Geometry.BackingSize())
	}
	return h, nil
}

// State is a volume's metadata as found on disk, after journal replay,
// read without any key: what status shows.
type State struct {
	Header      *layout.Header
	Slots       []layout.Slot
	Entries     []uint32
	Epoch       uint64
	Replayed    int // journal records applied
	JournalUsed uint32
	Touched     map[uint64]struct{}
	// Unfinished holds the ciphertext of the journal's last record when it
	// is a rekey record no later record retires: its in-place writes may
	// be torn, so these blocks are read from here (and rewritten on a
	// writable open).
	Unfinished map[uint64][]byte
	Rekeyed    int // rekey entries replayed
}

// Inspect reads header, key table, key map and journal, replaying the
// journal in memory. It writes nothing and needs no key.
func Inspect(st store.Store) (*State, error) {
	h, err := ReadHeader(st)
	if err != nil {
		return nil, err
	}
	g := h.Geometry
	s := &State{Header: h, Touched: map[uint64]struct{}{}}
	// Key table.
	kt := make([]byte, g.KeyTableBlocks()*layout.BlockSize)
	if _, err := st.ReadAt(kt, g.KeyTableOff()); err != nil {
		return nil, fmt.Errorf("volume: read key table: %w", err)
	}
	s.Slots = make([]layout.Slot, g.Slots)
	for i := uint32(1); i < g.Slots; i++ {
		sl, err := layout.DecodeSlot(i, kt[i*layout.SlotSize:])
		if err != nil {
			return nil, err
		}
		s.Slots[i] = *sl
	}
	if !s.Slots[h.VolumeKeySlot].HasKey() {
		return nil, fmt.Errorf("%w: volume key slot %d is not active", layout.ErrCorrupt, h.VolumeKeySlot)
	}
	// Key map pages; checksum failures are judged after replay.
	s.Entries = make([]uint32, g.Blocks())
	bad := map[uint64]error{}
	const pagesPerRead = 256
	buf := make([]byte, pagesPerRead*layout.BlockSize)
	for p := uint64(0); p < g.MapPages(); p += pagesPerRead {
		n := min(pagesPerRead, g.MapPages()-p)
		if _, err := st.ReadAt(buf[:n*layout.BlockSize], g.MapPageOff(p)); err != nil {
			return nil, fmt.Errorf("volume: read key map: %w", err)
		}
		for i := uint64(0); i < n; i++ {
			lo := (p + i) * layout.EntriesPerPage
			hi := min(lo+layout.EntriesPerPage, g.Blocks())
			if err := layout.DecodeMapPage(p+i, buf[i*layout.BlockSize:], s.Entries[lo:hi]); err != nil {
				bad[p+i] = err
			}
		}
	}
	// Journal.
	sb := make([]byte, layout.BlockSize)
	if _, err := st.ReadAt(sb, g.JournalOff()); err != nil {
		return nil, fmt.Errorf("volume: read journal: %w", err)
	}
	if s.Epoch, err = layout.DecodeJournalSuper(sb); err != nil {
		return nil, err
	}
	var pos uint32
	for seq := uint64(0); pos < g.JournalRecordBlocks(); seq++ {
		first := make([]byte, layout.BlockSize)
		if _, err := st.ReadAt(first, g.JournalRecordOff(pos)); err != nil {
			return nil, fmt.Errorf("volume: read journal: %w", err)
		}
		ri, ok := layout.PeekJournalRecord(first)
		if !ok || ri.Epoch != s.Epoch || ri.Seq != seq || pos+uint32(ri.Blocks) > g.JournalRecordBlocks() {
			break
		}
		rec := make([]byte, ri.Blocks*layout.BlockSize)
		if _, err := st.ReadAt(rec, g.JournalRecordOff(pos)); err != nil {
			return nil, fmt.Errorf("volume: read journal: %w", err)
		}
		if ri.Kind == layout.RecordRekey {
			_, ents, data, err := layout.DecodeRekeyRecord(rec)
			if err != nil {
				break // torn: its blocks were never touched in place
			}
			s.Unfinished = map[uint64][]byte{}
			for i, e := range ents {
				if e.Block >= g.Blocks() || e.To == 0 || e.To >= g.Slots {
					return nil, fmt.Errorf("%w: rekey record %d names block %d slot %d", layout.ErrCorrupt, seq, e.Block, e.To)
				}
				s.Entries[e.Block] = e.To
				s.Touched[layout.PageOfBlock(e.Block)] = struct{}{}
				s.Unfinished[e.Block] = data[i*layout.BlockSize : (i+1)*layout.BlockSize]
			}
			s.Rekeyed += len(ents)
		} else {
			_, ents, err := layout.DecodeJournalRecord(rec)
			if err != nil {
				break // torn tail: it was never acknowledged
			}
			// Any later record was written after a sync that covered
			// the earlier rekey's in-place writes: it is finished.
			s.Unfinished = nil
			for _, e := range ents {
				if e.Block >= g.Blocks() || e.Value >= g.Slots {
					return nil, fmt.Errorf("%w: journal record %d names block %d slot %d", layout.ErrCorrupt, seq, e.Block, e.Value)
				}
				s.Entries[e.Block] = e.Value
				s.Touched[layout.PageOfBlock(e.Block)] = struct{}{}
			}
		}
		pos += uint32(ri.Blocks)
		s.Replayed++
	}
	s.JournalUsed = pos
	for p, err := range bad {
		if _, ok := s.Touched[p]; !ok {
			return nil, fmt.Errorf("%w (not repaired by the journal; the volume's key map is damaged)", err)
		}
	}
	for b, e := range s.Entries {
		if e != layout.FreeEntry && (e >= g.Slots || s.Slots[e].State == layout.SlotEmpty) {
			return nil, fmt.Errorf("%w: block %d names key slot %d, which holds no key", layout.ErrCorrupt, b, e)
		}
	}
	return s, nil
}

// Open opens a volume: it replays the journal, unwraps every data key and,
// unless read-only, checkpoints so the journal starts empty.
func Open(ctx context.Context, st store.Store, opt Options) (*Volume, error) {
	s, err := Inspect(st)
	if err != nil {
		return nil, err
	}
	log := opt.Logger
	if log == nil {
		log = slog.Default()
	}
	pt, err := keys.ParsePrincipals(s.Header.ProviderConfig)
	if err != nil {
		return nil, err
	}
	g := s.Header.Geometry
	v := &Volume{
		st: st, hdr: s.Header, geo: g, readOnly: opt.ReadOnly, log: log,
		principals:   pt,
		provs:        map[uint16]keys.Provider{},
		slots:        s.Slots,
		entries:      make([]atomic.Uint32, g.Blocks()),
		dirty:        map[uint64]struct{}{},
		epoch:        s.Epoch,
		nextSeq:      uint64(s.Replayed),
		journalUsed:  s.JournalUsed,
		touchedPages: s.Touched,
		rawKeys:      make([]*keys.Secret, g.Slots),
	}
	v.counts = make([]atomic.Int64, g.Slots)
	for i, e := range s.Entries {
		if e != layout.FreeEntry && s.Slots[e].State == layout.SlotDestroyed {
			e = layout.FreeEntry // crypto-shredded: nothing to return
		}
		v.entries[i].Store(e)
		if e != layout.FreeEntry {
			v.counts[e].Add(1)
		}
	}
	v.epochSeen.Store(s.Epoch)
	v.rk.kick = make(chan struct{}, 1)
	v.initOwners()
	v.overlay = s.Unfinished
	v.ciphers = make([]atomic.Pointer[cipherRef], g.Slots)
	if opt.Provider != nil {
		v.provs[pt.Current] = opt.Provider
	}
	if err := v.unwrapAll(ctx); err != nil {
		v.closeKeys()
		return nil, err
	}
	if !opt.ReadOnly {
		// Finish an interrupted rekey: its ciphertext goes in place, and
		// the checkpoint's data sync covers it.
		for b, ct := range v.overlay {
			if _, err := st.WriteAt(ct, g.BlockOff(b)); err != nil {
				v.closeKeys()
				return nil, fmt.Errorf("volume: finish interrupted rekey of block %d: %w", b, err)
			}
		}
		v.overlay = nil
		v.commitMu.Lock()
		err := v.commitLocked(true) // fold the replayed journal into the map
		v.commitMu.Unlock()
		if err != nil {
			v.closeKeys()
			return nil, err
		}
		v.hdr.Flags &^= layout.FlagClean
		v.hdr.LastOpen = now()
		v.hdr.Seq++
		if err := writeHeader(st, v.hdr); err != nil {
			v.closeKeys()
			return nil, err
		}
	}
	return v, nil
}

// Close commits, checkpoints, marks the volume clean and wipes every key.
// It does not close the store.
func (v *Volume) Close() error {
	if v.closed.Swap(true) {
		return nil
	}
	var err error
	if !v.readOnly && !v.failed.Load() {
		v.commitMu.Lock()
		err = v.commitLocked(true)
		v.commitMu.Unlock()
		if err == nil {
			v.hdr.Flags |= layout.FlagClean
			v.hdr.LastClean = now()
			v.hdr.Seq++
			err = writeHeader(v.st, v.hdr)
		}
	}
	v.closeKeys()
	return err
}
