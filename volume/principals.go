package volume

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
)

// Per-database principal keys: a tenant's database can have its own KMS
// key. Its relations' data keys are wrapped by that key; revoking it in
// the KMS makes that database's blocks unreadable (those keys are wiped,
// their I/O fails) and leaves every other database, the WAL and the
// filesystem working.

// wantPrincipal is the principal entry that should wrap slot sl.
// slotsMu is held.
func (v *Volume) wantPrincipal(sl *layout.Slot) uint16 {
	if sl.Kind == layout.KindRelation {
		return v.principals.ForDatabase(sl.Database)
	}
	return v.principals.Current
}

// addPrincipalLocked lists prov under an unused entry number (in memory;
// the caller writes the header) and returns the number. slotsMu is held.
func (v *Volume) addPrincipalLocked(prov keys.Provider) uint16 {
	next := uint16(0)
	for n := range v.principals.Keys {
		next = max(next, n+1)
	}
	v.principals.Keys[next] = prov.Config()
	v.provs[next] = prov
	return next
}

// markSuspendedLocked records that principal entry n is revoked. slotsMu
// is held.
func (v *Volume) markSuspendedLocked(n uint16, reason error) {
	if v.suspendedPrincipals == nil {
		v.suspendedPrincipals = map[uint16]error{}
	}
	v.suspendedPrincipals[n] = reason
}

// SetDatabasePrincipal gives database db its own principal key: the
// header lists it first (crash-safe: every slot still names the key that
// wraps it), then every data key of the database is rewrapped under it.
// New relations of db are wrapped by it from then on.
func (v *Volume) SetDatabasePrincipal(ctx context.Context, db uint32, prov keys.Provider) (int, error) {
	if v.readOnly {
		return 0, ErrReadOnly
	}
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	n := v.addPrincipalLocked(prov)
	if v.principals.Databases == nil {
		v.principals.Databases = map[uint32]uint16{}
	}
	v.principals.Databases[db] = n
	if err := v.writePrincipalsLocked(); err != nil {
		return 0, err
	}
	done, err := v.rewrapLocked(ctx, func(i uint32, sl *layout.Slot) bool {
		return sl.Kind == layout.KindRelation && sl.Database == db && sl.Principal != n
	}, n, nil)
	if err != nil {
		return done, err
	}
	return done, v.dropUnusedPrincipalsLocked()
}

// rewrapLocked rewraps every keyed slot pick selects under principal entry
// n, one sector-atomic slot write each, then syncs. slotsMu is held.
func (v *Volume) rewrapLocked(ctx context.Context, pick func(i uint32, sl *layout.Slot) bool, n uint16, progress Progress) (int, error) {
	prov, err := v.provider(ctx, n)
	if err != nil {
		return 0, err
	}
	var todo []uint32
	for i := uint32(1); i < uint32(len(v.slots)); i++ {
		if v.slots[i].HasKey() && pick(i, &v.slots[i]) {
			todo = append(todo, i)
		}
	}
	for done, i := range todo {
		if v.rawKeys[i] == nil {
			return done, fmt.Errorf("volume: key slot %d is not unwrapped (its principal key is unavailable); cannot rewrap", i)
		}
		w, err := prov.Wrap(ctx, v.rawKeys[i], layout.WrapAAD(v.hdr.UUID, i))
		if err != nil {
			return done, fmt.Errorf("volume: rewrap key slot %d: %w (the volume still opens; run the command again)", i, err)
		}
		old := v.slots[i]
		sl := old
		sl.Nonce, sl.Ciphertext, sl.Tag = w.Nonce, w.Ciphertext, w.Tag
		sl.Principal = n
		sl.Generation++
		v.slots[i] = sl
		if err := v.writeSlot(i); err != nil {
			v.slots[i] = old
			return done, err
		}
		if progress != nil {
			progress(uint64(done+1), uint64(len(todo)))
		}
	}
	if err := v.st.Sync(); err != nil {
		return len(todo), v.fail(fmt.Errorf("volume: sync key table: %w", err))
	}
	return len(todo), nil
}

// dropUnusedPrincipalsLocked removes entries that no slot names and that
// are neither the current key nor a database's. slotsMu is held.
func (v *Volume) dropUnusedPrincipalsLocked() error {
	used := map[uint16]bool{v.principals.Current: true}
	for _, n := range v.principals.Databases {
		used[n] = true
	}
	for i := range v.slots {
		if v.slots[i].HasKey() {
			used[v.slots[i].Principal] = true
		}
	}
	changed := false
	for n := range v.principals.Keys {
		if !used[n] {
			delete(v.principals.Keys, n)
			if p, ok := v.provs[n]; ok {
				p.Close()
				delete(v.provs, n)
			}
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return v.writePrincipalsLocked()
}

// PrincipalError is a principal key that failed its check.
type PrincipalError struct {
	Entry    uint16
	Database []uint32 // databases it serves; empty for the cluster key
	Err      error
}

// CheckPrincipals asks the KMS about every principal key in use, and
// returns those that failed.
func (v *Volume) CheckPrincipals(ctx context.Context) []PrincipalError {
	v.slotsMu.Lock()
	type item struct {
		n uint16
		p keys.Provider
	}
	var items []item
	for n, p := range v.provs {
		items = append(items, item{n, p})
	}
	dbs := map[uint16][]uint32{}
	for db, n := range v.principals.Databases {
		dbs[n] = append(dbs[n], db)
	}
	v.slotsMu.Unlock()
	sort.Slice(items, func(i, j int) bool { return items[i].n < items[j].n })
	var out []PrincipalError
	for _, it := range items {
		if err := it.p.Check(ctx); err != nil {
			out = append(out, PrincipalError{Entry: it.n, Database: dbs[it.n], Err: err})
		}
	}
	return out
}

// IsRevoked reports whether a check error means the key is gone for good
// (revoked, destroyed, deleted), as opposed to the KMS being unreachable.
func IsRevoked(err error) bool {
	return errors.Is(err, keys.ErrPrincipalInactive) || errors.Is(err, keys.ErrPrincipalNotFound)
}

// SuspendPrincipal wipes the data keys principal entry n wraps: their
// blocks fail to read and write; everything else goes on. For the cluster
// key that is the whole volume (Suspend).
func (v *Volume) SuspendPrincipal(n uint16, reason error) {
	v.slotsMu.Lock()
	cluster := n == v.principals.Current
	v.slotsMu.Unlock()
	if cluster {
		v.Suspend(reason)
		return
	}
	v.gate.Lock()
	defer v.gate.Unlock()
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	if v.suspendedPrincipals[n] != nil {
		return
	}
	v.markSuspendedLocked(n, reason)
	wiped := 0
	for i := range v.slots {
		if v.slots[i].HasKey() && v.slots[i].Principal == n {
			v.setCipher(uint32(i), nil)
			v.rawKeys[i].Wipe()
			v.rawKeys[i] = nil
			wiped++
		}
	}
	var dbs []uint32
	for db, m := range v.principals.Databases {
		if m == n {
			dbs = append(dbs, db)
		}
	}
	v.log.Error("principal key of a database revoked: its data keys are wiped, its blocks fail I/O; other databases go on", "principal", n, "databases", dbs, "keys_wiped", wiped, "reason", reason)
}

// SuspendedPrincipals lists principal entries suspended, with why.
func (v *Volume) SuspendedPrincipals() map[uint16]string {
	v.slotsMu.Lock()
	defer v.slotsMu.Unlock()
	out := map[uint16]string{}
	for n, e := range v.suspendedPrincipals {
		out[n] = e.Error()
	}
	return out
}
