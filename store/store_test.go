package store_test

import (
	"bytes"
	"errors"
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/store/storetest"
)

func TestFileConformance(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol")
	f, err := store.CreateFile(path, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	storetest.Run(t, f, func() store.Store {
		g, err := store.OpenFile(path, false)
		if err != nil {
			t.Fatal(err)
		}
		return g
	})
}

func TestCrashConformance(t *testing.T) {
	c := store.NewCrash(make([]byte, 2<<20), 512)
	storetest.Run(t, c, func() store.Store { return store.NewCrash(c.Image(), 512) })
}

func TestFileLockRefusesSecondWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol")
	f, err := store.CreateFile(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := store.OpenFile(path, false); !errors.Is(err, store.ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
}

// TestCrashKeepsSyncedAndLosesSomeUnsynced checks the model itself: synced
// bytes always survive; unsynced sectors come back as one of their versions.
func TestCrashKeepsSyncedAndLosesSomeUnsynced(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	lost, kept := 0, 0
	for i := 0; i < 200; i++ {
		c := store.NewCrash(make([]byte, 8192), 512)
		c.WriteAt(bytes.Repeat([]byte{1}, 512), 0)
		c.Sync()
		c.WriteAt(bytes.Repeat([]byte{2}, 1024), 0)
		c.WriteAt(bytes.Repeat([]byte{3}, 512), 512)
		img := c.Crash(rng)
		if img[0] != 1 && img[0] != 2 {
			t.Fatalf("sector 0 = %d, want 1 or 2", img[0])
		}
		if v := img[512]; v != 0 && v != 2 && v != 3 {
			t.Fatalf("sector 1 = %d, want 0, 2 or 3", v)
		}
		if img[0] == 1 {
			lost++
		} else {
			kept++
		}
	}
	if lost == 0 || kept == 0 {
		t.Fatalf("crash model never varied: lost=%d kept=%d", lost, kept)
	}
}

func TestVolatileConformanceAndLoss(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol")
	f, err := store.CreateFile(path, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	v := store.NewVolatile(f)
	storetest.Run(t, v, func() store.Store {
		g, _ := store.OpenFile(path, false)
		return g
	})
	// Unsynced writes never reach the file.
	g, _ := store.OpenFile(path, false)
	w := store.NewVolatile(g)
	w.WriteAt([]byte("lost"), 0)
	raw := make([]byte, 4)
	g.ReadAt(raw, 0)
	if string(raw) == "lost" {
		t.Fatal("unsynced write reached the file")
	}
	w.Sync()
	g.ReadAt(raw, 0)
	if string(raw) != "lost" {
		t.Fatal("synced write did not reach the file")
	}
	g.Close()
}
