package volume

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

// Golden volumes: small format-v1 volumes, made once by fixed writes and
// checked in, that every later build must still open and read the same.
// testdata/v1/clean.img.gz was closed cleanly; journal.img.gz was cut off
// after a commit, so opening it replays v1 journal records; rekey.img.gz
// ends in an unfinished rekey record (see updateGoldenRekey). Regenerate
// (only for a deliberate format change, with a new version directory) with
//
//	go test ./volume -run TestGoldenVolumes -update-golden
var updateGolden = flag.Bool("update-golden", false, "rewrite testdata golden volumes")

// updateGoldenRekey writes only rekey.img.gz, from clean.img.gz: a relation
// key was made, the written blocks of 0..7 were rekeyed to it, and the power went after
// the rekey record was synced but before any in-place write reached the
// media — so opening it must finish the rekey from the journal.
var updateGoldenRekey = flag.Bool("update-golden-rekey", false, "rewrite testdata/v1/rekey.img.gz")

const goldenDir = "testdata/v1"

// goldenWrites are the fixed writes; the expected content follows from them.
func goldenWrites(v *Volume) {
	v.WriteAt(bytes.Repeat([]byte("tdeshim golden block zero "), 158)[:4096], 0, false)
	p := make([]byte, 3*4096)
	for i := range p {
		p[i] = byte(i * 13)
	}
	v.WriteAt(p, 5*4096, false)
	v.Trim(6*4096, 4096, false)
	v.WriteAt(bytes.Repeat([]byte{0x5a}, 512), 100*4096+1024, false)
	v.Flush()
}

func goldenMore(v *Volume) {
	v.WriteAt(bytes.Repeat([]byte{0xa5}, 8192), 200*4096, false)
	v.Trim(0, 4096, false)
	v.Flush()
}

func TestGoldenVolumes(t *testing.T) {
	keyPath := filepath.Join(goldenDir, "TEST-ONLY-principal.hex")
	if *updateGolden {
		os.MkdirAll(goldenDir, 0o755)
		os.Remove(keyPath)
		if err := keys.CreateKeyFile(keyPath); err != nil {
			t.Fatal(err)
		}
		geo := layout.Geometry{Size: 1 << 20, Slots: 8, JournalBlocks: 8}
		st := store.NewCrash(make([]byte, geo.BackingSize()), 512)
		prov := openProvider(t, keyPath)
		if err := Create(context.Background(), st, geo, prov, nil); err != nil {
			t.Fatal(err)
		}
		v, err := Open(context.Background(), st, Options{Provider: prov, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		goldenWrites(v)
		v.Close()
		writeGz(t, filepath.Join(goldenDir, "clean.img.gz"), st.Image())
		v, _ = Open(context.Background(), st, Options{Provider: openProvider(t, keyPath), Logger: quiet})
		goldenMore(v)
		writeGz(t, filepath.Join(goldenDir, "journal.img.gz"), st.Crash(rand.New(rand.NewSource(1))))
		v.closeKeys()
	}
	os.Chmod(keyPath, 0o600) // git does not keep modes
	if *updateGoldenRekey {
		st := store.NewCrash(readGz(t, filepath.Join(goldenDir, "clean.img.gz")), 512)
		v, err := Open(context.Background(), st, Options{Provider: openProvider(t, keyPath), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		ix := layout.NewIndex(v.geo.Blocks())
		v.SetIndex(ix)
		rel := layout.RelKey{Tablespace: 1663, Database: 5, RelNode: 16384}
		if _, err := v.EnsureRelationKey(context.Background(), rel); err != nil {
			t.Fatal(err)
		}
		ix.SetFile("base/5/16384", layout.Owner{Kind: layout.KindRelation, Rel: rel}, []layout.IndexExtent{{Start: 0, Len: 8}})
		moved, err := v.rekeyBatch([]uint64{0, 5, 6, 7}, func(b uint64, e uint32) uint32 { return v.rekeyTarget(ix, b, e) })
		if err != nil || len(moved) == 0 {
			t.Fatalf("rekey: %v %v", moved, err)
		}
		geo := v.geo
		img := st.CrashKeeping(func(off, n int64) bool { return off < geo.DataOff() })
		v.closeKeys()
		writeGz(t, filepath.Join(goldenDir, "rekey.img.gz"), img)
	}
	for name, want := range map[string]string{
		"clean.img.gz":   "195fa186845667a95c5e37453c611ba2a9c678bbc713304e4af78def4d3a77f9",
		"journal.img.gz": "5d7bd50ea890f2a50b666d7fb3805c672c28d51f948f23ad8b11fe4d1fe12a19",
		"rekey.img.gz":   "195fa186845667a95c5e37453c611ba2a9c678bbc713304e4af78def4d3a77f9",
	} {
		img := readGz(t, filepath.Join(goldenDir, name))
		s, err := Inspect(store.NewCrash(img, 512))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if name == "journal.img.gz" && s.Replayed == 0 {
			t.Fatalf("%s: no journal records to replay", name)
		}
		if name == "rekey.img.gz" && (len(s.Unfinished) == 0 || s.Rekeyed == 0) {
			t.Fatalf("%s: no unfinished rekey record to replay", name)
		}
		v, err := Open(context.Background(), store.NewCrash(img, 512), Options{Provider: openProvider(t, keyPath), Logger: quiet, ReadOnly: true})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		content := make([]byte, v.Size())
		if err := v.ReadAt(content, 0); err != nil {
			t.Fatal(err)
		}
		v.Close()
		if name == "rekey.img.gz" {
			// A writable open finishes the rekey in place.
			st := store.NewCrash(img, 512)
			v, err := Open(context.Background(), st, Options{Provider: openProvider(t, keyPath), Logger: quiet})
			if err != nil {
				t.Fatalf("%s: writable open: %v", name, err)
			}
			again := make([]byte, v.Size())
			v.ReadAt(again, 0)
			e := v.entries[0].Load()
			kind := v.slots[e].Kind
			v.Close()
			if !bytes.Equal(again, content) || kind != layout.KindRelation {
				t.Fatalf("%s: after finishing the rekey: same content %v, block 0 under a %d-kind key", name, bytes.Equal(again, content), kind)
			}
		}
		// Recompute what the fixed writes must have produced.
		ref := expectedGolden(t, name == "journal.img.gz")
		if !bytes.Equal(content, ref) {
			t.Fatalf("%s: content differs from the fixed writes", name)
		}
		sum := sha256.Sum256(content)
		if got := hex.EncodeToString(sum[:]); got != want {
			t.Errorf("%s: content sha256 %s, want %s", name, got, want)
		}
	}
}

// expectedGolden replays the fixed writes on a fresh volume in memory.
func expectedGolden(t *testing.T, more bool) []byte {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	v := mustOpen(t, st, kf)
	defer v.Close()
	goldenWrites(v)
	if more {
		goldenMore(v)
	}
	out := make([]byte, v.Size())
	v.ReadAt(out, 0)
	return out
}

func writeGz(t *testing.T, path string, b []byte) {
	var buf bytes.Buffer
	w, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	w.Write(b)
	w.Close()
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readGz(t *testing.T, path string) []byte {
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("golden volume missing: %v", err)
	}
	defer f.Close()
	r, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
