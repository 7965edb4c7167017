package store

import "sync"

// Volatile wraps a store with a modelled volatile write cache: writes and
// punches stay in memory until Sync, so a SIGKILL of the process loses
// exactly what a power cut would lose on a disk with a write-back cache.
// It exists for power-loss tests (serve --unsafe-volatile-cache-model);
// never for real data.
type Volatile struct {
	inner   Store
	mu      sync.Mutex
	pending []op
}

// NewVolatile wraps inner.
func NewVolatile(inner Store) *Volatile { return &Volatile{inner: inner} }

func (v *Volatile) ReadAt(p []byte, off int64) (int, error) {
	n, err := v.inner.ReadAt(p, off)
	if err != nil {
		return n, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	overlay(p, off, v.pending)
	return n, nil
}

func (v *Volatile) WriteAt(p []byte, off int64) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.pending = append(v.pending, op{off: off, data: append([]byte(nil), p...), n: int64(len(p))})
	return len(p), nil
}

func (v *Volatile) Punch(off, length int64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.pending = append(v.pending, op{off: off, n: length})
	return nil
}

// Sync writes the cache through, in order, then syncs the inner store.
func (v *Volatile) Sync() error {
	v.mu.Lock()
	ops := v.pending
	v.pending = nil
	v.mu.Unlock()
	for _, o := range ops {
		var err error
		if o.data == nil {
			err = v.inner.Punch(o.off, o.n)
		} else {
			_, err = v.inner.WriteAt(o.data, o.off)
		}
		if err != nil {
			return err
		}
	}
	return v.inner.Sync()
}

func (v *Volatile) Size() int64  { return v.inner.Size() }
func (v *Volatile) Close() error { return v.inner.Close() }
