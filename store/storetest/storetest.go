// Package storetest is the conformance suite every store.Store passes.
package storetest

import (
	"bytes"
	"testing"

	"github.com/tdeshim/tdeshim/store"
)

// Run checks the Store contract on a store of at least 1 MiB that starts as
// zeros. reopen, when not nil, returns the same store after Close+open, to
// check that synced data survives.
func Run(t *testing.T, s store.Store, reopen func() store.Store) {
	t.Helper()
	if s.Size() < 1<<20 {
		t.Fatalf("store too small: %d", s.Size())
	}
	buf := bytes.Repeat([]byte("tdeshim!"), 1024) // 8 KiB
	if _, err := s.WriteAt(buf, 4096); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	got := make([]byte, len(buf))
	if _, err := s.ReadAt(got, 4096); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read after write: err=%v equal=%v", err, bytes.Equal(got, buf))
	}
	if err := s.Punch(4096, 4096); err != nil {
		t.Fatalf("Punch: %v", err)
	}
	s.ReadAt(got, 4096)
	if !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatal("punched range does not read as zeros")
	}
	if !bytes.Equal(got[4096:], buf[4096:]) {
		t.Fatal("punch reached beyond its range")
	}
	if err := s.Sync(); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if reopen == nil {
		return
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s = reopen()
	defer s.Close()
	s.ReadAt(got, 4096)
	if !bytes.Equal(got[:4096], make([]byte, 4096)) || !bytes.Equal(got[4096:], buf[4096:]) {
		t.Fatal("synced content lost across reopen")
	}
}
