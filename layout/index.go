package layout

import (
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
)

// The block → file index says which file owns each device block, as far as
// the watcher knows. It lives in memory only (the watcher rebuilds it from
// the mounted filesystem), is written by one goroutine at a time and read
// by the I/O path without locks: the device is cut into chunks of
// IndexChunkBlocks blocks, each an immutable sorted extent list behind an
// atomic pointer, replaced whole when a file in it changes.

// Forks of a relation file.
const (
	ForkMain = 0
	ForkFSM  = 1
	ForkVM   = 2
	ForkInit = 3
)

// Well-known tablespaces.
const (
	DefaultTablespace = 1663 // pg_default: base/
	GlobalTablespace  = 1664 // pg_global: global/
)

// RelKey names one relfilenode: all its forks and segments share a key.
type RelKey struct {
	Tablespace, Database, RelNode uint32
}

// String is TABLESPACE/DATABASE/RELFILENODE (OIDs), as the commands take it.
func (r RelKey) String() string {
	return strconv.FormatUint(uint64(r.Tablespace), 10) + "/" + strconv.FormatUint(uint64(r.Database), 10) + "/" + strconv.FormatUint(uint64(r.RelNode), 10)
}

// Owner is what a file is to PostgreSQL: a relation fork segment, a WAL
// segment, or anything else (KindVolume).
type Owner struct {
	Rel     RelKey
	Segment uint32
	Kind    uint8 // KindVolume, KindWAL or KindRelation
	Fork    uint8
}

// IndexChunkBlocks is the span of one index chunk (128 MiB).
const IndexChunkBlocks = 1 << 15

// IndexExtent is a run of device blocks of one file.
type IndexExtent struct {
	Start, Len uint64 // device blocks
}

type chunkExtent struct {
	start, n uint32 // block offset within the chunk, length
	file     uint32 // file id (for removal)
	owner    Owner
}

type chunk struct{ ext []chunkExtent }

// Index maps device blocks to owners.
type Index struct {
	chunks []atomic.Pointer[chunk]
	gen    atomic.Uint64

	mu     sync.Mutex // writers
	files  map[string]*indexFile
	nextID uint32
}

type indexFile struct {
	id    uint32
	owner Owner
	ext   []IndexExtent
}

// NewIndex returns an empty index for a device of blocks blocks.
func NewIndex(blocks uint64) *Index {
	n := (blocks + IndexChunkBlocks - 1) / IndexChunkBlocks
	return &Index{chunks: make([]atomic.Pointer[chunk], n), files: map[string]*indexFile{}}
}

// Lookup returns the owner of device block b; ok is false when no known
// file holds it. Safe to call from any goroutine, never blocks.
func (x *Index) Lookup(b uint64) (Owner, bool) {
	ci := b / IndexChunkBlocks
	if ci >= uint64(len(x.chunks)) {
		return Owner{}, false
	}
	c := x.chunks[ci].Load()
	if c == nil {
		return Owner{}, false
	}
	off := uint32(b % IndexChunkBlocks)
	i := sort.Search(len(c.ext), func(i int) bool { return c.ext[i].start+c.ext[i].n > off })
	if i < len(c.ext) && c.ext[i].start <= off {
		return c.ext[i].owner, true
	}
	return Owner{}, false
}

// Gen changes whenever the index does.
func (x *Index) Gen() uint64 { return x.gen.Load() }

// SetFile records that the file at path (any stable name) is owner and
// occupies extents, replacing what was known of it. A block another file
// held goes to this one: the newest report wins, the other file's report
// is stale.
func (x *Index) SetFile(path string, owner Owner, extents []IndexExtent) {
	x.mu.Lock()
	defer x.mu.Unlock()
	f := x.files[path]
	if f == nil {
		x.nextID++
		f = &indexFile{id: x.nextID}
		x.files[path] = f
	}
	old := f.ext
	f.owner, f.ext = owner, clipExtents(extents, uint64(len(x.chunks))*IndexChunkBlocks)
	x.rebuild(f.id, old, f)
}

// RemoveFile forgets the file at path.
func (x *Index) RemoveFile(path string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	f := x.files[path]
	if f == nil {
		return
	}
	delete(x.files, path)
	x.rebuild(f.id, f.ext, nil)
}

// Paths returns the known file names.
func (x *Index) Paths() []string {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := make([]string, 0, len(x.files))
	for p := range x.files {
		out = append(out, p)
	}
	return out
}

// Files is the number of known files.
func (x *Index) Files() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.files)
}

// Relations returns every relfilenode with at least one known file, and
// the blocks its files occupy.
func (x *Index) Relations() map[RelKey]uint64 {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := map[RelKey]uint64{}
	for _, f := range x.files {
		if f.owner.Kind != KindRelation {
			continue
		}
		n := out[f.owner.Rel]
		for _, e := range f.ext {
			n += e.Len
		}
		out[f.owner.Rel] = n
	}
	return out
}

// Walk calls fn for every indexed run, in device order, from a snapshot
// of each chunk; fn returning false stops it.
func (x *Index) Walk(fn func(start, n uint64, o Owner) bool) {
	for ci := range x.chunks {
		c := x.chunks[ci].Load()
		if c == nil {
			continue
		}
		base := uint64(ci) * IndexChunkBlocks
		for _, e := range c.ext {
			if !fn(base+uint64(e.start), uint64(e.n), e.owner) {
				return
			}
		}
	}
}

// MemoryBytes estimates the index's heap use.
func (x *Index) MemoryBytes() uint64 {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := uint64(len(x.chunks)) * 8
	for ci := range x.chunks {
		if c := x.chunks[ci].Load(); c != nil {
			n += 24 + uint64(cap(c.ext))*uint64(chunkExtentSize)
		}
	}
	for p, f := range x.files {
		n += uint64(len(p)) + 64 + uint64(cap(f.ext))*16
	}
	return n
}

const chunkExtentSize = 32 // sizeof(chunkExtent), rounded as the compiler lays it out

func clipExtents(in []IndexExtent, limit uint64) []IndexExtent {
	out := make([]IndexExtent, 0, len(in))
	for _, e := range in {
		if e.Start >= limit || e.Len == 0 {
			continue
		}
		e.Len = min(e.Len, limit-e.Start)
		out = append(out, e)
	}
	return out
}

// chunksOf lists the chunk numbers extents touch.
func chunksOf(ext []IndexExtent, into map[uint64]struct{}) {
	for _, e := range ext {
		for c := e.Start / IndexChunkBlocks; c <= (e.Start+e.Len-1)/IndexChunkBlocks; c++ {
			into[c] = struct{}{}
		}
	}
}

// rebuild replaces, in every chunk that old or f's extents touch, the runs
// of file id by f's (nil f: removes them). x.mu is held.
func (x *Index) rebuild(id uint32, old []IndexExtent, f *indexFile) {
	touched := map[uint64]struct{}{}
	chunksOf(old, touched)
	if f != nil {
		chunksOf(f.ext, touched)
	}
	for ci := range touched {
		base := ci * IndexChunkBlocks
		var add []chunkExtent
		if f != nil {
			for _, e := range f.ext {
				lo, hi := max(e.Start, base), min(e.Start+e.Len, base+IndexChunkBlocks)
				if lo < hi {
					add = append(add, chunkExtent{start: uint32(lo - base), n: uint32(hi - lo), file: id, owner: f.owner})
				}
			}
		}
		var keep []chunkExtent
		if c := x.chunks[ci].Load(); c != nil {
			for _, e := range c.ext {
				if e.file == id {
					continue
				}
				keep = append(keep, subtract(e, add)...)
			}
		}
		all := append(keep, add...)
		sort.Slice(all, func(i, j int) bool { return all[i].start < all[j].start })
		if len(all) == 0 {
			x.chunks[ci].Store(nil)
		} else {
			x.chunks[ci].Store(&chunk{ext: all})
		}
	}
	x.gen.Add(1)
}

// subtract returns what is left of e outside every run of cut.
func subtract(e chunkExtent, cut []chunkExtent) []chunkExtent {
	parts := []chunkExtent{e}
	for _, c := range cut {
		var next []chunkExtent
		for _, p := range parts {
			pe, ce := p.start+p.n, c.start+c.n
			if ce <= p.start || c.start >= pe {
				next = append(next, p)
				continue
			}
			if p.start < c.start {
				l := p
				l.n = c.start - p.start
				next = append(next, l)
			}
			if ce < pe {
				r := p
				r.start, r.n = ce, pe-ce
				next = append(next, r)
			}
		}
		parts = next
	}
	return parts
}
