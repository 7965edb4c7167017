package volume

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

// newKeyFile creates a principal key file and returns its path.
func newKeyFile(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "principal.key")
	if err := keys.CreateKeyFile(p); err != nil {
		t.Fatal(err)
	}
	return p
}

func openProvider(t testing.TB, path string) keys.Provider {
	t.Helper()
	p, err := keys.OpenFileProvider(path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// newCrashVolume creates a volume of size bytes on a crash-model store.
func newCrashVolume(t testing.TB, size uint64, keyFile string) (*store.Crash, layout.Geometry) {
	t.Helper()
	geo := layout.Geometry{Size: size, Slots: 64, JournalBlocks: 8}
	st := store.NewCrash(make([]byte, geo.BackingSize()), 512)
	prov := openProvider(t, keyFile)
	defer prov.Close()
	if err := Create(context.Background(), st, geo, prov, nil); err != nil {
		t.Fatal(err)
	}
	if err := st.Sync(); err != nil {
		t.Fatal(err)
	}
	return st, geo
}

func mustOpen(t testing.TB, st store.Store, keyFile string) *Volume {
	t.Helper()
	v, err := Open(context.Background(), st, Options{Provider: openProvider(t, keyFile), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))
