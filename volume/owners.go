package volume

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/tdeshim/tdeshim/crypto"
	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
)

// Which key a FREE block takes when it is written (DESIGN.md invariant 2):
// its owner's, as the block → file index says, looked up without waiting
// on anything; a WAL page header says WAL; otherwise the volume key. Keys
// are created off the I/O path (EnsureRelationKey, by the watcher) and are
// durable in the key table before any block names them.

// ownerKeys maps owners to their active key slot.
type ownerKeys struct {
	mu  sync.RWMutex
	rel map[layout.RelKey]uint32
	wal uint32 // 0 until the WAL key exists
	vol atomic.Uint32
	// retiring slots: no new block takes them; the rekeyer empties them,
	// then they are destroyed. Indexed by slot, read by the rekeyer.
	retiring map[uint32]layout.Owner
	// destroyedEpoch: a destroyed slot may be reused once a checkpoint
	// after its destruction has made every key-map entry naming it FREE.
	destroyedEpoch map[uint32]uint64
}

func (v *Volume) volSlot() uint32 { return v.own.vol.Load() }

// initOwners builds the owner map from the key table at open.
func (v *Volume) initOwners() {
	v.own.rel = map[layout.RelKey]uint32{}
	v.own.retiring = map[uint32]layout.Owner{}
	v.own.destroyedEpoch = map[uint32]uint64{}
	v.own.vol.Store(v.hdr.VolumeKeySlot)
	for i := uint32(1); i < uint32(len(v.slots)); i++ {
		sl := &v.slots[i]
		switch {
		case sl.State == layout.SlotRetiring:
			v.own.retiring[i] = slotOwner(sl)
		case sl.State == layout.SlotDestroyed:
			v.own.destroyedEpoch[i] = 0
		case sl.State != layout.SlotActive:
		case sl.Kind == layout.KindRelation:
			v.own.rel[sl.Rel()] = i
		case sl.Kind == layout.KindWAL:
			v.own.wal = i
		case sl.Kind == layout.KindVolume && i != v.hdr.VolumeKeySlot:
			// A volume-key rotation cut short: a newer volume key was
			// written but the header never named it. Retire it.
			v.own.retiring[i] = slotOwner(sl)
		}
	}
}

// SetIndex gives the volume the block → file index the watcher feeds.
func (v *Volume) SetIndex(x *layout.Index) { v.index.Store(x) }

// Index returns the index set by SetIndex, or nil.
func (v *Volume) Index() *layout.Index { return v.index.Load() }

// slotForOwner is the active slot of o, or 0 when it has none yet.
// own.mu is held (shared).
func (v *Volume) slotForOwner(o layout.Owner) uint32 {
	switch o.Kind {
	case layout.KindRelation:
		return v.own.rel[o.Rel]
	case layout.KindWAL:
		return v.own.wal
	default:
		return v.volSlot()
	}
}

// assignKeys picks slots for the FREE blocks (free[i]) of a write of plain
// at b0. It never blocks on anything but a reader lock held for map
// lookups.
func (v *Volume) assignKeys(plain []byte, b0 uint64, slots []uint32, free []bool) {
	ix := v.index.Load()
	vol := v.volSlot()
	v.own.mu.RLock()
	defer v.own.mu.RUnlock()
	prevWAL := false
	for i := range slots {
		blk := plain[i*blockSize : (i+1)*blockSize]
		isHeader := layout.IsWALPageHeader(blk)
		wasPrev := prevWAL
		prevWAL = isHeader
		if !free[i] {
			continue
		}
		s := uint32(0)
		owned := false
		if ix != nil {
			var o layout.Owner
			if o, owned = ix.Lookup(b0 + uint64(i)); owned {
				s = v.slotForOwner(o)
			}
		}
		// A WAL page (8 KiB) spans two blocks; its header is in the first.
		if s == 0 && !owned && v.own.wal != 0 && (isHeader || wasPrev) {
			s = v.own.wal
		}
		if s == 0 {
			s = vol
		}
		slots[i] = s
	}
}

// RelationSlot returns rel's active key slot, 0 if it has none.
func (v *Volume) RelationSlot(rel layout.RelKey) uint32 {
	v.own.mu.RLock()
	defer v.own.mu.RUnlock()
	return v.own.rel[rel]
}

// EnsureRelationKey returns rel's key slot, creating, wrapping and durably
// recording a new random data key first if it has none. It may wait on the
// KMS: call it from the watcher, never from the I/O path.
func (v *Volume) EnsureRelationKey(ctx context.Context, rel layout.RelKey) (uint32, error) {
	if s := v.RelationSlot(rel); s != 0 {
		return s, nil
	}
	if err := v.EnsureRelationKeys(ctx, []layout.RelKey{rel}); err != nil {
		return 0, err
	}
	return v.RelationSlot(rel), nil
}

// EnsureRelationKeys makes sure every relation in rels has a key: the new
// keys are wrapped, written to their slots and made durable with one sync
// (a new database brings hundreds of relations at once).
func (v *Volume) EnsureRelationKeys(ctx context.Context, rels []layout.RelKey) error {
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	var todo []layout.RelKey
	seen := map[layout.RelKey]bool{}
	for _, r := range rels {
		if !seen[r] && v.RelationSlot(r) == 0 {
			todo = append(todo, r)
		}
		seen[r] = true
	}
	if len(todo) == 0 {
		return nil
	}
	slots, err := v.newKeys(ctx, layout.KindRelation, todo)
	v.own.mu.Lock()
	for i, s := range slots {
		v.own.rel[todo[i]] = s
	}
	v.own.mu.Unlock()
	return err
}

// EnsureWALKey returns the WAL key slot, creating it if needed.
func (v *Volume) EnsureWALKey(ctx context.Context) (uint32, error) {
	v.own.mu.RLock()
	s := v.own.wal
	v.own.mu.RUnlock()
	if s != 0 {
		return s, nil
	}
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	if v.own.wal != 0 {
		return v.own.wal, nil
	}
	s, err := v.newKey(ctx, layout.KindWAL, layout.RelKey{})
	if err != nil {
		return 0, err
	}
	v.own.mu.Lock()
	v.own.wal = s
	v.own.mu.Unlock()
	return s, nil
}

// ErrNoFreeSlot means the key table is full.
var ErrNoFreeSlot = errors.New("volume: the key table is full; new relations use the volume key until keys are shredded (or re-create the volume with more --slots)")

// allocSlot finds an empty slot, or a destroyed one whose destruction a
// checkpoint has made final. slotsMu is held; a slot handed out is marked
// active before slotsMu is next released with keyMu held by its caller.
func (v *Volume) allocSlot() (uint32, error) {
	for i := uint32(1); i < uint32(len(v.slots)); i++ {
		if v.slots[i].State == layout.SlotEmpty {
			return i, nil
		}
	}
	for i := uint32(1); i < uint32(len(v.slots)); i++ {
		if e, ok := v.own.destroyedEpoch[i]; ok && v.slots[i].State == layout.SlotDestroyed && e < v.epochSeen.Load() {
			return i, nil
		}
	}
	return 0, ErrNoFreeSlot
}

// newKey creates one key (see newKeys). keyMu is held.
func (v *Volume) newKey(ctx context.Context, kind uint8, rel layout.RelKey) (uint32, error) {
	s, err := v.newKeys(ctx, kind, []layout.RelKey{rel})
	if err != nil {
		return 0, err
	}
	return s[0], nil
}

// newKeys creates a random data key per owner, wraps each with the
// principal key of the owner's database (or the cluster's), writes their
// slots, syncs once, and installs their ciphers. On an error part way it
// returns the keys made so far (durable) and the error. keyMu is held.
func (v *Volume) newKeys(ctx context.Context, kind uint8, rels []layout.RelKey) ([]uint32, error) {
	if v.readOnly {
		return nil, ErrReadOnly
	}
	if err := v.writable(); err != nil {
		return nil, err
	}
	type made struct {
		slot   uint32
		secret *keys.Secret
		c      crypto.Cipher
	}
	var ready []made
	var firstErr error
	for _, rel := range rels {
		v.slotsMu.Lock()
		slot, err := v.allocSlot()
		pn := v.principals.Current
		if kind == layout.KindRelation {
			pn = v.principals.ForDatabase(rel.Database)
		}
		var prov keys.Provider
		if err == nil {
			prov, err = v.provider(ctx, pn)
		}
		v.slotsMu.Unlock()
		if err != nil {
			firstErr = err
			break
		}
		secret, err := keys.RandomSecret(crypto.KeySize)
		if err != nil {
			firstErr = err
			break
		}
		w, err := prov.Wrap(ctx, secret, layout.WrapAAD(v.hdr.UUID, slot))
		if err != nil {
			secret.Wipe()
			firstErr = fmt.Errorf("volume: wrap a new data key: %w", err)
			break
		}
		c, err := crypto.New(secret.Bytes())
		if err != nil {
			secret.Wipe()
			firstErr = err
			break
		}
		v.slotsMu.Lock()
		old := v.slots[slot]
		v.slots[slot] = layout.Slot{State: layout.SlotActive, Kind: kind, Principal: pn,
			Tablespace: rel.Tablespace, Database: rel.Database, RelNode: rel.RelNode, Created: now(),
			Nonce: w.Nonce, Ciphertext: w.Ciphertext, Tag: w.Tag}
		err = v.writeSlot(slot)
		if err != nil {
			v.slots[slot] = old
		}
		v.slotsMu.Unlock()
		if err != nil {
			secret.Wipe()
			c.Close()
			firstErr = err
			break
		}
		ready = append(ready, made{slot, secret, c})
	}
	if len(ready) > 0 {
		if err := v.st.Sync(); err != nil {
			// Not durable: none of them may be used.
			v.slotsMu.Lock()
			for _, m := range ready {
				v.slots[m.slot] = layout.Slot{}
				m.secret.Wipe()
				m.c.Close()
			}
			v.slotsMu.Unlock()
			return nil, v.fail(fmt.Errorf("volume: sync new data keys: %w", err))
		}
	}
	out := make([]uint32, len(ready))
	v.slotsMu.Lock()
	for i, m := range ready {
		delete(v.own.destroyedEpoch, m.slot)
		v.rawKeys[m.slot].Wipe()
		v.rawKeys[m.slot] = m.secret
		v.setCipher(m.slot, m.c)
		out[i] = m.slot
	}
	v.slotsMu.Unlock()
	v.stats.KeysCreated.Add(uint64(len(ready)))
	v.rk.gen.Add(1)
	return out, firstErr
}

// setSlotState rewrites slot i with a new state and syncs it. slotsMu is
// held.
func (v *Volume) setSlotState(i uint32, state uint8) error {
	old := v.slots[i]
	v.slots[i].State = state
	if state == layout.SlotDestroyed {
		// Crypto-shredding: the wrapped key is overwritten on disk.
		v.slots[i].Nonce = [layout.NonceSize]byte{}
		v.slots[i].Ciphertext = [layout.WrappedKeySize]byte{}
		v.slots[i].Tag = [layout.TagSize]byte{}
	}
	err := v.writeSlot(i)
	if err == nil {
		err = v.st.Sync()
	}
	if err != nil {
		v.slots[i] = old
		return fmt.Errorf("volume: update key slot %d: %w", i, err)
	}
	return nil
}

// Retire marks slot s retiring: no new block takes it and the rekeyer
// moves its blocks to their owners' keys (or the volume key), after which
// it is destroyed. The owner, if it still has files, gets a fresh key
// from the watcher (or at once, with fresh).
func (v *Volume) Retire(ctx context.Context, s uint32, fresh bool) error {
	if v.readOnly {
		return ErrReadOnly
	}
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	v.slotsMu.Lock()
	if s == 0 || s >= uint32(len(v.slots)) || v.slots[s].State != layout.SlotActive {
		v.slotsMu.Unlock()
		return fmt.Errorf("volume: key slot %d is not an active key", s)
	}
	sl := v.slots[s]
	if sl.Kind == layout.KindVolume {
		v.slotsMu.Unlock()
		return v.rotateVolumeKeyLocked(ctx, s)
	}
	err := v.setSlotState(s, layout.SlotRetiring)
	v.slotsMu.Unlock()
	if err != nil {
		return err
	}
	rel := sl.Rel()
	v.own.mu.Lock()
	v.own.retiring[s] = slotOwner(&sl)
	switch sl.Kind {
	case layout.KindRelation:
		if v.own.rel[rel] == s {
			delete(v.own.rel, rel)
		}
	case layout.KindWAL:
		if v.own.wal == s {
			v.own.wal = 0
		}
	}
	v.own.mu.Unlock()
	v.log.Info("key slot retiring", "slot", s, "kind", kindName(sl.Kind), "relation", relString(rel))
	v.KickRekeyer()
	if !fresh {
		return nil
	}
	n, err := v.newKey(ctx, sl.Kind, rel)
	if err != nil {
		return fmt.Errorf("volume: slot %d retires, but its replacement could not be made (the watcher retries): %w", s, err)
	}
	v.own.mu.Lock()
	if sl.Kind == layout.KindRelation {
		v.own.rel[rel] = n
	} else {
		v.own.wal = n
	}
	v.own.mu.Unlock()
	return nil
}

// rotateVolumeKeyLocked writes a new volume key, names it in the header,
// then retires the old one. A crash between leaves an unnamed volume-kind
// slot, which open retires. keyMu is held.
func (v *Volume) rotateVolumeKeyLocked(ctx context.Context, old uint32) error {
	n, err := v.newKey(ctx, layout.KindVolume, layout.RelKey{})
	if err != nil {
		return err
	}
	v.commitMu.Lock()
	v.hdr.VolumeKeySlot = n
	v.hdr.Seq++
	err = writeHeader(v.st, v.hdr)
	v.commitMu.Unlock()
	if err != nil {
		return v.fail(err)
	}
	v.own.vol.Store(n)
	v.slotsMu.Lock()
	err = v.setSlotState(old, layout.SlotRetiring)
	v.slotsMu.Unlock()
	if err != nil {
		return err
	}
	v.own.mu.Lock()
	v.own.retiring[old] = layout.Owner{Kind: layout.KindVolume}
	v.own.mu.Unlock()
	v.log.Info("volume key rotating", "old_slot", old, "new_slot", n)
	v.KickRekeyer()
	return nil
}

// destroyIfEmpty destroys retiring slot s when no live block names it:
// the wrapped key is overwritten and synced, the unwrapped key wiped.
func (v *Volume) destroyIfEmpty(s uint32) (bool, error) {
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	// Readers hold the gate shared while they use a cipher.
	v.gate.Lock()
	defer v.gate.Unlock()
	if v.counts[s].Load() != 0 {
		return false, nil
	}
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	if v.slots[s].Kind == layout.KindVolume && s == v.volSlot() {
		return false, fmt.Errorf("volume: refusing to destroy the current volume key (slot %d)", s)
	}
	// Retiring on disk, or an unnamed volume key left active by a
	// volume-key rotation cut short (open retires it in memory).
	orphan := v.slots[s].State == layout.SlotActive && v.slots[s].Kind == layout.KindVolume
	if v.slots[s].State != layout.SlotRetiring && !orphan {
		return false, nil
	}
	if err := v.setSlotState(s, layout.SlotDestroyed); err != nil {
		return false, err
	}
	v.setCipher(s, nil)
	v.rawKeys[s].Wipe()
	v.rawKeys[s] = nil
	v.own.mu.Lock()
	delete(v.own.retiring, s)
	v.own.destroyedEpoch[s] = v.epochSeen.Load()
	v.own.mu.Unlock()
	v.stats.KeysDestroyed.Add(1)
	sl := v.slots[s]
	v.log.Info("data key destroyed", "slot", s, "kind", kindName(sl.Kind),
		"relation", relString(sl.Rel()))
	return true, nil
}

// RetiringSlots lists the slots being emptied.
func (v *Volume) RetiringSlots() []uint32 {
	v.own.mu.RLock()
	defer v.own.mu.RUnlock()
	out := make([]uint32, 0, len(v.own.retiring))
	for s := range v.own.retiring {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// RelationKeys returns every relation with an active key.
func (v *Volume) RelationKeys() map[layout.RelKey]uint32 {
	v.own.mu.RLock()
	defer v.own.mu.RUnlock()
	out := make(map[layout.RelKey]uint32, len(v.own.rel))
	for k, s := range v.own.rel {
		out[k] = s
	}
	return out
}

// WALSlot is the WAL key's slot, 0 if none.
func (v *Volume) WALSlot() uint32 {
	v.own.mu.RLock()
	defer v.own.mu.RUnlock()
	return v.own.wal
}

// VolumeSlot is the volume key's slot.
func (v *Volume) VolumeSlot() uint32 { return v.volSlot() }

func kindName(k uint8) string {
	switch k {
	case layout.KindVolume:
		return "volume"
	case layout.KindWAL:
		return "wal"
	case layout.KindRelation:
		return "relation"
	}
	return fmt.Sprintf("kind-%d", k)
}

func relString(r layout.RelKey) string {
	if r == (layout.RelKey{}) {
		return ""
	}
	return r.String()
}

// slotOwner is the owner a slot's key was made for.
func slotOwner(sl *layout.Slot) layout.Owner {
	return layout.Owner{Kind: sl.Kind, Rel: sl.Rel()}
}

// RotateKeys gives every active key that sel picks a fresh replacement and
// retires it; the rekeyer then re-encrypts its blocks under the new key
// and destroys the old one. It returns the retired slots.
func (v *Volume) RotateKeys(ctx context.Context, sel func(slot uint32, sl layout.Slot) bool) ([]uint32, error) {
	var picked []uint32
	for i, sl := range v.Slots() {
		if i > 0 && sl.State == layout.SlotActive && sel(uint32(i), sl) {
			picked = append(picked, uint32(i))
		}
	}
	for _, s := range picked {
		if err := v.Retire(ctx, s, true); err != nil {
			return nil, err
		}
	}
	return picked, nil
}
