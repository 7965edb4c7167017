package store

import (
	"fmt"
	"math/rand"
	"sync"
)

// Crash is an in-memory store that models a disk with a volatile write
// cache: WriteAt and Punch land in the cache, Sync moves them to stable
// media, and Crash throws away an arbitrary part of the cache. For every
// sector touched since the last Sync the surviving content is the stable
// one or any one of the versions written since (a cache can write back an
// intermediate version and lose the last), chosen independently per sector.
// This is the failure model invariant 4 is tested against.
type Crash struct {
	mu      sync.Mutex
	sector  int
	stable  []byte
	pending []op
	crashed bool
}

type op struct {
	off  int64
	data []byte // nil means punch of length n
	n    int64
}

// NewCrash returns a crash-model store holding a copy of image; sector is
// the atomic write unit (512 models torn 4 KiB writes).
func NewCrash(image []byte, sector int) *Crash {
	return &Crash{sector: sector, stable: append([]byte(nil), image...)}
}

func (c *Crash) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return 0, ErrClosed
	}
	if off < 0 || off+int64(len(p)) > int64(len(c.stable)) {
		return 0, fmt.Errorf("crash store: read [%d,+%d) beyond %d", off, len(p), len(c.stable))
	}
	copy(p, c.stable[off:])
	overlay(p, off, c.pending)
	return len(p), nil
}

func (c *Crash) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return 0, ErrClosed
	}
	if off < 0 || off+int64(len(p)) > int64(len(c.stable)) {
		return 0, fmt.Errorf("crash store: write [%d,+%d) beyond %d", off, len(p), len(c.stable))
	}
	c.pending = append(c.pending, op{off: off, data: append([]byte(nil), p...), n: int64(len(p))})
	return len(p), nil
}

func (c *Crash) Punch(off, length int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return ErrClosed
	}
	c.pending = append(c.pending, op{off: off, n: length})
	return nil
}

func (c *Crash) Sync() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.crashed {
		return ErrClosed
	}
	for _, o := range c.pending {
		apply(c.stable, o, o.off, o.off+o.n)
	}
	c.pending = nil
	return nil
}

// overlay lays the cached ops, in order, over p (read at off): what a
// reader sees of a store with a write cache.
func overlay(p []byte, off int64, ops []op) {
	for _, o := range ops {
		lo, hi := max(off, o.off), min(off+int64(len(p)), o.off+o.n)
		if lo < hi {
			applyAt(p[lo-off:hi-off], o, lo, hi)
		}
	}
}

// applyAt writes op o's bytes for the absolute range [lo, hi) into dst,
// which starts at lo.
func applyAt(dst []byte, o op, lo, hi int64) {
	if o.data == nil {
		clear(dst[:hi-lo])
	} else {
		copy(dst[:hi-lo], o.data[lo-o.off:hi-o.off])
	}
}

// apply writes op o's bytes for [lo, hi) into the whole image dst.
func apply(dst []byte, o op, lo, hi int64) { applyAt(dst[lo:hi], o, lo, hi) }

func (c *Crash) Size() int64 { return int64(len(c.stable)) }

func (c *Crash) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.crashed = true
	return nil
}

// Crash pulls the power: every later call fails, and the returned image is
// what the media holds, with each unsynced sector resolved at random.
func (c *Crash) Crash(rng *rand.Rand) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.crashed = true
	img := append([]byte(nil), c.stable...)
	// versions[sector] = indices of pending ops touching it, in order.
	versions := map[int64][]int{}
	for i, o := range c.pending {
		for s := o.off / int64(c.sector); s*int64(c.sector) < o.off+o.n; s++ {
			versions[s] = append(versions[s], i)
		}
	}
	for s, ops := range versions {
		pick := rng.Intn(len(ops) + 1) // 0 = stable survives
		if pick == 0 {
			continue
		}
		o := c.pending[ops[pick-1]]
		lo, hi := max(s*int64(c.sector), o.off), min((s+1)*int64(c.sector), o.off+o.n)
		// A sector only partly covered by the op keeps the rest from the
		// versions before it; replay them in order up to the pick.
		for _, j := range ops[:pick-1] {
			p := c.pending[j]
			apply(img, p, max(s*int64(c.sector), p.off), min((s+1)*int64(c.sector), p.off+p.n))
		}
		apply(img, o, lo, hi)
	}
	return img
}

// Image returns the stable content plus the cache, as a clean shutdown
// would leave it.
func (c *Crash) Image() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	img := append([]byte(nil), c.stable...)
	for _, o := range c.pending {
		apply(img, o, o.off, o.off+o.n)
	}
	return img
}

// CrashKeeping pulls the power with a chosen outcome: of the cached
// writes, exactly those for which keep says true reach the media (in
// order); the rest are lost. Tests use it for the reorderings that random
// per-sector choice almost never produces, such as a whole multi-block
// journal record surviving while a data write before it is lost.
func (c *Crash) CrashKeeping(keep func(off, n int64) bool) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.crashed = true
	img := append([]byte(nil), c.stable...)
	for _, o := range c.pending {
		if keep(o.off, o.n) {
			apply(img, o, o.off, o.off+o.n)
		}
	}
	return img
}
