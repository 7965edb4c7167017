package volume

import (
	"bytes"
	"context"
	"math/rand"
	"testing"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

// limitStore pulls the power (a crash-model store crash) after n writes
// and syncs: the cut can fall between a write and the sync after it.
type limitStore struct {
	*store.Crash
	n   int
	img []byte
	rng *rand.Rand
}

func (l *limitStore) WriteAt(p []byte, off int64) (int, error) {
	if l.n == 0 {
		if l.img == nil {
			l.img = l.Crash.Crash(l.rng)
		}
		return 0, store.ErrClosed
	}
	l.n--
	return l.Crash.WriteAt(p, off)
}

func (l *limitStore) Sync() error {
	if l.n == 0 {
		if l.img == nil {
			l.img = l.Crash.Crash(l.rng)
		}
		return store.ErrClosed
	}
	l.n--
	return l.Crash.Sync()
}

// TestRotatePrincipalCrashAnywhereStillOpens: a rotation cut off after any
// number of writes leaves a volume that opens (with the keys the header
// lists) and reads the same data; a finished one opens with the new key
// alone.
func TestRotatePrincipalCrashAnywhereStillOpens(t *testing.T) {
	oldKey, newKey := newKeyFile(t), newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, oldKey)
	v := mustOpen(t, st, oldKey)
	// Extra slots, as relations will have.
	for i := uint32(2); i < 12; i++ {
		k, _ := keys.RandomSecret(64)
		w, _ := v.Provider().Wrap(context.Background(), k, layout.WrapAAD(v.hdr.UUID, i))
		k.Wipe()
		v.slots[i] = layout.Slot{State: layout.SlotActive, Kind: layout.KindRelation, RelNode: 16384 + i, Nonce: w.Nonce, Ciphertext: w.Ciphertext, Tag: w.Tag}
		v.writeSlot(i)
	}
	data := bytes.Repeat([]byte("rotate me "), 410)[:4096]
	v.WriteAt(data, 8192, true)
	v.Close()
	base := st.Image()
	for n := 0; n < 40; n++ {
		ls := &limitStore{Crash: store.NewCrash(base, 512), n: 1 << 30, rng: rand.New(rand.NewSource(int64(n)))}
		v, err := Open(context.Background(), ls, Options{Provider: openProvider(t, oldKey), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		ls.n = n
		rerr := v.RotatePrincipal(context.Background(), openProvider(t, newKey), nil)
		v.closeKeys()
		img := ls.img
		if img == nil {
			img = ls.Image()
		}
		// Open from what the header lists (both key files exist).
		v2, err := Open(context.Background(), store.NewCrash(img, 512), Options{Logger: quiet})
		if err != nil {
			t.Fatalf("rotation cut after %d writes (err %v): volume does not open: %v", n, rerr, err)
		}
		got := make([]byte, 4096)
		v2.ReadAt(got, 8192)
		if !bytes.Equal(got, data) {
			t.Fatalf("cut after %d writes: data differs", n)
		}
		done := rerr == nil
		pt := v2.Principals()
		v2.Close()
		if done {
			if len(pt.Keys) != 1 || pt.CurrentConfig().KeyFile != newKey {
				t.Fatalf("finished rotation still lists %d keys", len(pt.Keys))
			}
			// The new key alone opens it.
			v3, err := Open(context.Background(), store.NewCrash(img, 512), Options{Provider: openProvider(t, newKey), Logger: quiet})
			if err != nil {
				t.Fatalf("new key alone does not open a rotated volume: %v", err)
			}
			v3.Close()
		}
	}
}
