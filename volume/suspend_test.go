package volume

import (
	"errors"
	"testing"
)

func TestSuspendWipesKeysAndFailsIO(t *testing.T) {
	kf := newKeyFile(t)
	st, _ := newCrashVolume(t, 1<<20, kf)
	v := mustOpen(t, st, kf)
	defer v.Close()
	p := make([]byte, 4096)
	if err := v.WriteAt(p, 0, false); err != nil {
		t.Fatal(err)
	}
	v.Suspend(errors.New("test"))
	if err := v.ReadAt(p, 0); !errors.Is(err, ErrSuspended) {
		t.Fatalf("read after suspend: %v", err)
	}
	if err := v.WriteAt(p, 4096, false); !errors.Is(err, ErrSuspended) {
		t.Fatalf("write after suspend: %v", err)
	}
	for i, k := range v.rawKeys {
		if k != nil {
			t.Fatalf("slot %d key still in memory", i)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatalf("flush of already written ciphertext must still work: %v", err)
	}
}
