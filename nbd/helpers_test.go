package nbd_test

import (
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

func newRand() *rand.Rand { return rand.New(rand.NewSource(1)) }

// reopen opens a crashed image with the fixture's principal key.
func reopen(t *testing.T, img []byte, key string) *volume.Volume {
	t.Helper()
	st := store.NewCrash(img, 512)
	kf := filepath.Join(t.TempDir(), "k")
	os.WriteFile(kf, []byte(key), 0o600)
	prov, err := keys.OpenFileProvider(kf)
	if err != nil {
		t.Fatal(err)
	}
	v, err := volume.Open(context.Background(), st, volume.Options{Provider: prov})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}
