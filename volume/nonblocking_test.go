package volume

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
)

// stallingProvider is a principal key whose Wrap hangs until released: a
// KMS that stopped answering.
type stallingProvider struct {
	keys.Provider
	entered chan struct{}
	release chan struct{}
}

func (p *stallingProvider) Wrap(ctx context.Context, k *keys.Secret, aad []byte) (keys.Wrapped, error) {
	select {
	case p.entered <- struct{}{}:
	default:
	}
	<-p.release
	return p.Provider.Wrap(ctx, k, aad)
}

// TestIOPathDoesNotWaitForTheKMS (invariant 2): while a new relation's key
// is being wrapped by a KMS that does not answer, reads, writes to that
// relation's free blocks (they take the volume key), FLUSH, status and the
// rekeyer's bookkeeping all go on; the key arrives later.
func TestIOPathDoesNotWaitForTheKMS(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	prov := &stallingProvider{Provider: openProvider(t, kf), entered: make(chan struct{}, 1), release: make(chan struct{})}
	v, err := Open(context.Background(), st, Options{Provider: prov, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ix := layout.NewIndex(v.geo.Blocks())
	v.SetIndex(ix)
	rel := layout.RelKey{Tablespace: 1663, Database: 5, RelNode: 777}
	ix.SetFile("base/5/777", layout.Owner{Kind: layout.KindRelation, Rel: rel}, []layout.IndexExtent{{Start: 10, Len: 4}})
	keyDone := make(chan error, 1)
	go func() { _, err := v.EnsureRelationKey(context.Background(), rel); keyDone <- err }()
	select {
	case <-prov.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("key creation never reached the KMS")
	}
	io := make(chan error, 1)
	go func() {
		if err := v.WriteAt(blockContent("rel", 10), 10*blockSize, false); err != nil {
			io <- err
			return
		}
		if err := v.Flush(); err != nil {
			io <- err
			return
		}
		got := make([]byte, blockSize)
		if err := v.ReadAt(got, 10*blockSize); err != nil {
			io <- err
			return
		}
		if !bytes.Equal(got, blockContent("rel", 10)) {
			t.Error("read back differs")
		}
		_ = v.KeyReport()
		_ = v.RekeyStatsSnapshot()
		io <- nil
	}()
	select {
	case err := <-io:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		close(prov.release)
		t.Fatal("I/O waited for the KMS")
	}
	if e := v.entries[10].Load(); e != v.VolumeSlot() {
		t.Fatalf("block written while the key was pending is under slot %d, want the volume key %d", e, v.VolumeSlot())
	}
	close(prov.release)
	if err := <-keyDone; err != nil {
		t.Fatal(err)
	}
	// Now the rekeyer moves it, and new writes take the relation key.
	if err := v.Settle(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(blockContent("rel", 11), 11*blockSize, false); err != nil {
		t.Fatal(err)
	}
	s := v.RelationSlot(rel)
	if v.entries[10].Load() != s || v.entries[11].Load() != s {
		t.Fatalf("blocks 10, 11 under slots %d, %d; relation key is %d", v.entries[10].Load(), v.entries[11].Load(), s)
	}
}
