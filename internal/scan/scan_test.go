package scan

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCountFindsMatchesAcrossChunkBoundaries(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	b := make([]byte, 3*chunk)
	needle := []byte("CANARY-x")
	offs := []int{0, chunk - 3, 2*chunk - 1, 3*chunk - len(needle)}
	for _, o := range offs {
		copy(b[o:], needle)
	}
	os.WriteFile(p, b, 0o600)
	n, err := Count(p, needle)
	if err != nil || n != len(offs) {
		t.Fatalf("Count = %d, %v; want %d", n, err, len(offs))
	}
	if w, at, _ := First(p, []byte("absent"), needle); w != 1 || at != 0 {
		t.Fatalf("First = %d at %d, want needle 1 at 0", w, at)
	}
	if w, at, _ := First(p, []byte("absent")); w != -1 || at != -1 {
		t.Fatalf("First of an absent string = %d at %d", w, at)
	}
}

func TestEachReportsEachMatchOnceWithNeedlesOfDifferentLength(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	b := make([]byte, 2*chunk)
	copy(b[chunk-4:], "ab")   // short needle inside the carried tail
	copy(b[chunk-20:], "xyz") // and one well before it
	copy(b[2*chunk-100:], "a-much-longer-needle")
	os.WriteFile(p, b, 0o600)
	seen := map[int64]int{}
	err := Each(p, [][]byte{[]byte("ab"), []byte("xyz"), []byte("a-much-longer-needle")}, func(w int, off int64) bool {
		seen[off]++
		return true
	})
	if err != nil || len(seen) != 3 {
		t.Fatalf("matches %v, err %v; want 3 distinct", seen, err)
	}
	for off, n := range seen {
		if n != 1 {
			t.Fatalf("match at %d reported %d times", off, n)
		}
	}
}
