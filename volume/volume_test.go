package volume

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"strings"
	"testing"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
)

func TestWriteReadReopen(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	v := mustOpen(t, st, kf)
	rng := rand.New(rand.NewSource(7))
	want := make([]byte, 1<<20)
	for i := 0; i < 200; i++ {
		off := int64(rng.Intn(2048)) * 512
		n := (rng.Intn(24) + 1) * 512
		if off+int64(n) > int64(len(want)) {
			continue
		}
		p := make([]byte, n)
		rng.Read(p)
		if err := v.WriteAt(p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	got := make([]byte, len(want))
	if err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back before close: err=%v equal=%v", err, bytes.Equal(got, want))
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v = mustOpen(t, store.NewCrash(st.Image(), 512), kf)
	defer v.Close()
	clear(got)
	if err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back after reopen: err=%v equal=%v", err, bytes.Equal(got, want))
	}
}

func TestTrimAndZeroReadZerosAndPunch(t *testing.T) {
	kf := newKeyFile(t)
	st, geo := newCrashVolume(t, 1<<20, kf)
	v := mustOpen(t, st, kf)
	defer v.Close()
	data := bytes.Repeat([]byte{0xAB}, 64<<10)
	v.WriteAt(data, 0, false)
	if err := v.Trim(4096, 12288, false); err != nil {
		t.Fatal(err)
	}
	if err := v.Zero(16384, 4096, false, false, false); err != nil {
		t.Fatal(err)
	}
	if err := v.Zero(20480+512, 1024, false, false, false); err != nil { // partial block: RMW
		t.Fatal(err)
	}
	if err := v.Zero(32768, 4096, true, true, false); !errors.Is(err, ErrNotFast) {
		t.Fatalf("NO_HOLE|FAST_ZERO: %v, want ErrNotFast", err)
	}
	got := make([]byte, len(data))
	v.ReadAt(got, 0)
	for off := 0; off < len(got); off += 512 {
		zero := (off >= 4096 && off < 20480) || (off >= 20480+512 && off < 20480+1536)
		if zero != (got[off] == 0) {
			t.Fatalf("offset %d: zero=%v but byte is %#x", off, zero, got[off])
		}
	}
	ext, _ := v.Status(0, 64<<10, 100)
	if len(ext) < 3 || ext[0].Free || !ext[1].Free || ext[1].Length != 16384 {
		t.Fatalf("block status %+v, want data, then 16 KiB hole", ext)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, 4096)
	st.ReadAt(raw, geo.BlockOff(1))
	if !bytes.Equal(raw, make([]byte, 4096)) {
		t.Fatal("trimmed block not punched after flush")
	}
}

func TestRequestChecks(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	v := mustOpen(t, st, kf)
	defer v.Close()
	if err := v.WriteAt(make([]byte, 4096), 1<<20, false); !errors.Is(err, ErrRange) {
		t.Fatalf("write past end: %v", err)
	}
	if err := v.ReadAt(make([]byte, 4096), 1<<20-2048); !errors.Is(err, ErrRange) {
		t.Fatalf("read across end: %v", err)
	}
	if err := v.WriteAt(make([]byte, 100), 0, false); !errors.Is(err, ErrAlign) {
		t.Fatalf("unaligned write: %v", err)
	}
}

// TestNoPlaintextAtRest: canaries written through the volume never appear
// in the backing store, whether flushed, unflushed or crashed.
func TestNoPlaintextAtRest(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 4<<20, kf)
	v := mustOpen(t, st, kf)
	canaries := []string{"CANARY-credit-card-4111111111111111", "CANARY-patient-record-0042", "CANARY-zeroed-then-written"}
	for i, c := range canaries {
		p := bytes.Repeat([]byte(c+"|"), 4096*3/len(c))
		p = p[:4096*3]
		v.WriteAt(p, int64(i)*64<<10, i == 1)
		v.WriteAt(p[:512], int64(i)*64<<10+200*4096+512, false) // RMW path
	}
	v.Zero(0, 4096, true, false, false) // NO_HOLE zeros are ciphertext too
	scan := func(img []byte, when string) {
		for _, c := range canaries {
			if bytes.Contains(img, []byte(c)) {
				t.Fatalf("%s: canary %q found in backing store", when, c)
			}
		}
	}
	scan(st.Image(), "before flush")
	v.Flush()
	scan(st.Image(), "after flush")
	scan(st.Crash(rand.New(rand.NewSource(1))), "after crash")
	// And the canaries are really there, through the volume.
	v2 := mustOpen(t, store.NewCrash(st.Image(), 512), kf)
	defer v2.Close()
	got := make([]byte, 4096)
	v2.ReadAt(got, 64<<10)
	if !strings.Contains(string(got), canaries[1]) {
		t.Fatal("FUA-written canary not readable after crash")
	}
}

func TestWrongKeyIsAClearError(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	other := openProvider(t, newKeyFile(t))
	_, err := Open(context.Background(), st, Options{Provider: other})
	if !errors.Is(err, keys.ErrWrongKey) {
		t.Fatalf("open with another key: %v, want ErrWrongKey", err)
	}
	if !strings.Contains(err.Error(), "key does not open this volume") {
		t.Fatalf("error does not say what is wrong: %v", err)
	}
}

func TestHeaderCopiesAndCorruption(t *testing.T) {
	kf := newKeyFile(t)
	st, geo := newCrashVolume(t, 1<<20, kf)
	img := st.Image()
	// One torn copy: the other still opens the volume.
	for c := 0; c < 2; c++ {
		bad := append([]byte(nil), img...)
		bad[c*4096+100] ^= 0xff
		v, err := Open(context.Background(), store.NewCrash(bad, 512), Options{Provider: openProvider(t, kf)})
		if err != nil {
			t.Fatalf("copy %d damaged: %v", c, err)
		}
		v.Close()
	}
	both := append([]byte(nil), img...)
	both[100] ^= 0xff
	both[4096+100] ^= 0xff
	if _, err := Open(context.Background(), store.NewCrash(both, 512), Options{Provider: openProvider(t, kf)}); !errors.Is(err, layout.ErrCorrupt) {
		t.Fatalf("both copies damaged: %v, want ErrCorrupt", err)
	}
	if _, err := Inspect(store.NewCrash(make([]byte, 1<<20), 512)); !errors.Is(err, layout.ErrNotVolume) {
		t.Fatalf("zeros: %v, want ErrNotVolume", err)
	}
	if _, err := Inspect(store.NewCrash(img[:geo.BackingSize()-4096], 512)); !errors.Is(err, layout.ErrCorrupt) {
		t.Fatalf("truncated: %v, want ErrCorrupt", err)
	}
	// A damaged key slot is caught by its checksum, not used as a key.
	slot := append([]byte(nil), img...)
	slot[geo.SlotOff(1)+50] ^= 1
	if _, err := Inspect(store.NewCrash(slot, 512)); !errors.Is(err, layout.ErrCorrupt) {
		t.Fatalf("damaged slot: %v, want ErrCorrupt", err)
	}
}

func TestJournalFillsAndCheckpoints(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 8<<20, kf)
	v := mustOpen(t, st, kf)
	p := make([]byte, 4096)
	for b := 0; b < 2048; b++ {
		p[0] = byte(b)
		v.WriteAt(p, int64(b)*4096, false)
		if b%37 == 0 {
			v.Flush()
		}
	}
	v.Flush()
	if v.stats.Checkpoints.Load() < 2 {
		t.Fatalf("journal of 7 blocks never filled? checkpoints=%d", v.stats.Checkpoints.Load())
	}
	img := st.Crash(rand.New(rand.NewSource(3)))
	v2 := mustOpen(t, store.NewCrash(img, 512), kf)
	defer v2.Close()
	for b := 0; b < 2048; b++ {
		v2.ReadAt(p, int64(b)*4096)
		if p[0] != byte(b) {
			t.Fatalf("block %d lost after checkpoints and crash", b)
		}
	}
}

func TestReadOnlyRefusesWrites(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	v, err := Open(context.Background(), st, Options{ReadOnly: true, Provider: openProvider(t, kf)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("write on read-only: %v", err)
	}
	if err := v.Trim(0, 4096, false); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("trim on read-only: %v", err)
	}
}
