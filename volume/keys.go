package volume

import (
	"context"
	"errors"
	"fmt"

	"github.com/tdeshim/tdeshim/crypto"
	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
)

// provider returns the open provider for principal entry n, opening it
// from the header's settings if needed. slotsMu is held.
func (v *Volume) provider(ctx context.Context, n uint16) (keys.Provider, error) {
	if p, ok := v.provs[n]; ok {
		return p, nil
	}
	cfg, ok := v.principals.Keys[n]
	if !ok {
		return nil, fmt.Errorf("%w: a key slot names principal key %d, which the header does not list", layout.ErrCorrupt, n)
	}
	p, err := keys.Open(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("principal key %d (%s %s): %w", n, cfg.Provider, cfg.Principal, err)
	}
	v.provs[n] = p
	return p, nil
}

func wrapped(sl *layout.Slot) keys.Wrapped {
	return keys.Wrapped{Nonce: sl.Nonce, Ciphertext: sl.Ciphertext, Tag: sl.Tag}
}

// unwrapAll unwraps every active slot, in batches per principal key where
// the provider can batch, and keys a cipher for each.
func (v *Volume) unwrapAll(ctx context.Context) error {
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	byPrincipal := map[uint16][]uint32{}
	for i := uint32(1); i < uint32(len(v.slots)); i++ {
		if v.slots[i].HasKey() {
			byPrincipal[v.slots[i].Principal] = append(byPrincipal[v.slots[i].Principal], i)
		}
	}
	dbOnly := map[uint16]bool{}
	for _, n := range v.principals.Databases {
		dbOnly[n] = n != v.principals.Current
	}
	for n, slots := range byPrincipal {
		p, err := v.provider(ctx, n)
		if err == nil && dbOnly[n] {
			err = p.Check(ctx)
		}
		if err != nil && dbOnly[n] && IsRevoked(err) {
			// A tenant's key revoked: its database stays unreadable,
			// the rest of the volume opens.
			v.log.Error("a database's principal key is revoked; its relations stay unreadable", "principal", n, "keys", len(slots), "err", err)
			v.markSuspendedLocked(n, err)
			continue
		}
		if err != nil {
			return err
		}
		ws := make([]keys.Wrapped, len(slots))
		aads := make([][]byte, len(slots))
		for j, i := range slots {
			ws[j], aads[j] = wrapped(&v.slots[i]), layout.WrapAAD(v.hdr.UUID, i)
		}
		var secrets []*keys.Secret
		if b, ok := p.(keys.BatchUnwrapper); ok {
			secrets, err = b.UnwrapBatch(ctx, ws, aads)
		} else {
			for j := range ws {
				var s *keys.Secret
				if s, err = p.Unwrap(ctx, ws[j], aads[j]); err != nil {
					err = fmt.Errorf("key slot %d: %w", slots[j], err)
					break
				}
				secrets = append(secrets, s)
			}
		}
		if err != nil {
			for _, s := range secrets {
				s.Wipe()
			}
			return fmt.Errorf("volume %x: unwrap: %w", v.hdr.UUID[:4], err)
		}
		for j, i := range slots {
			c, err := crypto.New(secrets[j].Bytes())
			if err != nil {
				return fmt.Errorf("volume: key slot %d: %w", i, err)
			}
			v.setCipher(i, c)
			v.rawKeys[i] = secrets[j]
		}
	}
	return nil
}

// closeKeys wipes every data key and closes every provider.
func (v *Volume) closeKeys() {
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	for i := range v.ciphers {
		v.setCipher(uint32(i), nil)
		v.rawKeys[i].Wipe()
	}
	for _, p := range v.provs {
		p.Close()
	}
	v.provs = map[uint16]keys.Provider{}
}

// writeSlot encodes, writes and syncs slot i: durable before any key-map
// entry or header names it. slotsMu is held.
func (v *Volume) writeSlot(i uint32) error {
	if _, err := v.st.WriteAt(layout.EncodeSlot(i, &v.slots[i]), v.geo.SlotOff(i)); err != nil {
		return fmt.Errorf("volume: write key slot %d: %w", i, err)
	}
	return nil
}

// RotatePrincipal rewraps every data key under the principal key of prov,
// online. Order, so that a crash at any point leaves the volume openable:
// the header first lists the new key beside the old; each slot is then
// rewritten (a sector-atomic write) naming the key that wraps it; last the
// header drops keys no slot names. The old key can be revoked afterwards.
func (v *Volume) RotatePrincipal(ctx context.Context, prov keys.Provider, progress Progress) error {
	if v.readOnly {
		return ErrReadOnly
	}
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	next := v.addPrincipalLocked(prov)
	if err := v.writePrincipalsLocked(); err != nil {
		return err
	}
	// Databases with their own principal key keep it.
	cur := v.principals.Current
	if _, err := v.rewrapLocked(ctx, func(i uint32, sl *layout.Slot) bool {
		return v.wantPrincipal(sl) == cur
	}, next, progress); err != nil {
		return err
	}
	v.principals.Current = next
	if err := v.writePrincipalsLocked(); err != nil {
		return err
	}
	return v.dropUnusedPrincipalsLocked()
}

func (v *Volume) writePrincipalsLocked() error {
	b, err := v.principals.Marshal()
	if err != nil {
		return err
	}
	if len(b) > layout.MaxProviderConfig {
		return errors.New("volume: principal-key settings too large for the header")
	}
	v.commitMu.Lock()
	defer v.commitMu.Unlock()
	v.hdr.ProviderConfig = b
	v.hdr.Seq++
	return writeHeader(v.st, v.hdr)
}

// ErrSuspended is returned for every read and write after Suspend.
var ErrSuspended = errors.New("volume suspended: its principal key was revoked or destroyed in the KMS; key material is wiped. Restore the key (or rotate) and restart serve")

// Suspend wipes every data key and fails all further reads and writes: what
// a revoked principal key must mean for a running server (LUKS suspend).
// In-flight requests finish first. Only a restart brings the volume back.
func (v *Volume) Suspend(reason error) {
	v.gate.Lock()
	defer v.gate.Unlock()
	if v.suspended.Swap(true) {
		return
	}
	v.log.Error("suspending volume: data keys wiped, I/O now fails", "reason", reason)
	v.slotsMu.Lock()
	for i := range v.ciphers {
		v.setCipher(uint32(i), nil)
		v.rawKeys[i].Wipe()
		v.rawKeys[i] = nil
	}
	v.slotsMu.Unlock()
}

// Suspended reports whether Suspend ran.
func (v *Volume) Suspended() bool { return v.suspended.Load() }
