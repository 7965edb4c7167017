package walwatch

import (
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tdeshim/tdeshim/internal/mounts"
	"github.com/tdeshim/tdeshim/layout"
)

// Volume is what the watcher needs of the open volume.
type Volume interface {
	DeviceReader
	EnsureRelationKeys(ctx context.Context, rels []layout.RelKey) error
	EnsureWALKey(ctx context.Context) (uint32, error)
	RelationKeys() map[layout.RelKey]uint32
	Retire(ctx context.Context, slot uint32, fresh bool) error
	SetIndex(x *layout.Index)
	Size() int64
}

// Catalog answers whether PostgreSQL's catalog still knows a relfilenode
// (with --dsn); a shred waits for it to say no.
type Catalog interface {
	Known(ctx context.Context, rel layout.RelKey) (bool, error)
}

// Config for a watcher.
type Config struct {
	Mount  string // where the volume's filesystem is (or will be) mounted
	Volume Volume
	Logger *slog.Logger
	// ShredGrace is how long a relfilenode's files must be gone before
	// its key is destroyed; negative disables shredding.
	ShredGrace time.Duration
	Catalog    Catalog       // optional
	Debounce   time.Duration // batching of change events (default 20 ms)
	Poll       time.Duration // mount checks (default 1 s)
}

// Watcher follows one mount.
type Watcher struct {
	cfg   Config
	log   *slog.Logger
	index *layout.Index

	mu     sync.Mutex
	status Status
	gone   map[layout.RelKey]time.Time
}

// Status is what the watcher knows, for serve's status.
type Status struct {
	Mount        string         `json:"mount"`
	Mounted      bool           `json:"mounted"`
	Problem      string         `json:"problem,omitempty"` // why it is not indexing
	DataDir      string         `json:"data_dir,omitempty"`
	Files        int            `json:"files"`
	Scans        int            `json:"scans"`
	Events       uint64         `json:"events"`
	LastScan     time.Time      `json:"last_scan"`
	IndexBytes   uint64         `json:"index_bytes"`
	PendingShred []PendingShred `json:"pending_shred"`
}

// PendingShred is a relfilenode whose files are gone, in its grace period.
type PendingShred struct {
	Rel   layout.RelKey `json:"relation"`
	Since time.Time     `json:"since"`
	Due   time.Time     `json:"due"`
}

// New returns a watcher and installs its (empty) index in the volume.
func New(cfg Config) *Watcher {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 20 * time.Millisecond
	}
	if cfg.Poll <= 0 {
		cfg.Poll = time.Second
	}
	cfg.Mount = filepath.Clean(cfg.Mount)
	w := &Watcher{cfg: cfg, log: cfg.Logger.With("watch", cfg.Mount),
		index: layout.NewIndex(uint64(cfg.Volume.Size()) / layout.BlockSize),
		gone:  map[layout.RelKey]time.Time{}}
	w.status.Mount = cfg.Mount
	cfg.Volume.SetIndex(w.index)
	return w
}

// Index is the block → file index this watcher feeds.
func (w *Watcher) Index() *layout.Index { return w.index }

// Status returns a snapshot.
func (w *Watcher) Status() Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.status
	s.IndexBytes = w.index.MemoryBytes()
	s.PendingShred = nil
	for r, t := range w.gone {
		s.PendingShred = append(s.PendingShred, PendingShred{Rel: r, Since: t, Due: t.Add(w.cfg.ShredGrace)})
	}
	sort.Slice(s.PendingShred, func(i, j int) bool { return s.PendingShred[i].Since.Before(s.PendingShred[j].Since) })
	return s
}

func (w *Watcher) setProblem(p string) {
	w.mu.Lock()
	changed := w.status.Problem != p
	w.status.Problem = p
	w.mu.Unlock()
	if changed && p != "" {
		w.log.Warn("not indexing the data directory: per-relation keys wait", "why", p)
	}
}

// Run watches until ctx ends: it waits for the mount, verifies it, indexes
// and follows it, and starts over when it is unmounted.
func (w *Watcher) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		err := VerifyMount(w.cfg.Mount, w.cfg.Volume)
		w.mu.Lock()
		w.status.Mounted = err == nil
		w.mu.Unlock()
		switch {
		case errors.Is(err, ErrNotMounted):
			w.setProblem("nothing is mounted at " + w.cfg.Mount + " yet")
		case err != nil:
			w.setProblem(err.Error())
		default:
			w.setProblem("")
			w.log.Info("filesystem on this volume is mounted; indexing")
			if err := w.follow(ctx); err != nil && ctx.Err() == nil {
				w.log.Warn("watch ended; starting over", "err", err)
			}
			w.mu.Lock()
			w.gone = map[layout.RelKey]time.Time{} // no shredding while not watching
			w.status.Mounted = false
			w.mu.Unlock()
		}
		waitMountChange(ctx, w.cfg.Poll)
	}
	return nil
}

// waitMountChange returns when the mount table changes (the kernel marks
// /proc/self/mountinfo with POLLPRI), after at most d, or when ctx ends:
// a filesystem mounted right before initdb is indexed before initdb's
// first writes reach the device.
func waitMountChange(ctx context.Context, d time.Duration) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		time.Sleep(d)
		return
	}
	defer f.Close()
	deadline := time.Now().Add(d)
	pfd := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLPRI}}
	for ctx.Err() == nil && time.Now().Before(deadline) {
		n, err := unix.Poll(pfd, 50)
		if n > 0 && pfd[0].Revents&(unix.POLLPRI|unix.POLLERR) != 0 {
			return
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// follow indexes the mounted tree and follows its changes until it is
// unmounted or ctx ends.
func (w *Watcher) follow(ctx context.Context) error {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	t := &tree{w: w, fd: fd, wds: map[int32]string{}, dirty: map[string]struct{}{}}
	if err := t.rescan(ctx); err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	lastPoll, lastShred := time.Now(), time.Now()
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for ctx.Err() == nil {
		// Sleep until an event; once one came, gather for the debounce
		// interval before mapping (a burst of writes is one FIEMAP).
		if _, err := unix.Poll(pfd, int(w.cfg.Poll/time.Millisecond)); err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		for round := 0; round < 2; round++ {
			for {
				n, err := unix.Read(fd, buf)
				if n <= 0 || err != nil {
					break
				}
				if t.events(buf[:n]) {
					return errors.New("filesystem unmounted")
				}
			}
			if len(t.dirty) == 0 || round == 1 {
				break
			}
			time.Sleep(w.cfg.Debounce)
		}
		if t.overflow || t.rescanDue {
			if t.overflow {
				w.log.Warn("inotify queue overflowed; rescanning the whole tree")
			}
			if err := t.rescan(ctx); err != nil {
				return err
			}
		}
		t.flush(ctx)
		if time.Since(lastPoll) >= w.cfg.Poll {
			lastPoll = time.Now()
			if ok, _ := mounts.IsMountPoint(w.cfg.Mount); !ok {
				return errors.New("filesystem unmounted")
			}
			t.retryKeys(ctx)
		}
		if time.Since(lastShred) >= time.Second {
			lastShred = time.Now()
			w.shredCheck(ctx, t.dataDir != "")
		}
	}
	return nil
}

// tree is the state of one followed mount.
type tree struct {
	w       *Watcher
	fd      int
	wds     map[int32]string // watch descriptor → directory
	dirty   map[string]struct{}
	dataDir string
	spcDirs map[string]uint32 // tablespace directory (absolute) → OID
	needKey map[string]struct{}
	// mapped: size and allocated blocks of each file at its last FIEMAP;
	// an overwrite in place (most of PostgreSQL's writes) changes neither,
	// so it costs an lstat, not a FIEMAP and an index update.
	mapped   map[string][2]int64
	overflow bool
	// rescanDue: the layout changed (a data directory or tablespace
	// appeared): classify everything again.
	rescanDue bool
	dev       uint64
}

// rescan rebuilds the index from a walk of the whole mount.
func (t *tree) rescan(ctx context.Context) error {
	w := t.w
	t.overflow, t.rescanDue = false, false
	for wd := range t.wds {
		unix.InotifyRmWatch(t.fd, uint32(wd))
	}
	t.wds = map[int32]string{}
	t.needKey = map[string]struct{}{}
	t.dirty = map[string]struct{}{}
	t.mapped = map[string][2]int64{}
	var st unix.Stat_t
	if err := unix.Stat(w.cfg.Mount, &st); err != nil {
		return err
	}
	t.dev = st.Dev
	t.dataDir, _ = findDataDir(w.cfg.Mount)
	t.loadTablespaces()
	seen := map[string]struct{}{}
	err := filepath.WalkDir(w.cfg.Mount, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // vanished under us: the events will tell
		}
		if d.IsDir() {
			var s unix.Stat_t
			if unix.Lstat(p, &s) != nil || s.Dev != t.dev {
				return filepath.SkipDir
			}
			t.addWatch(p)
			return nil
		}
		if d.Type().IsRegular() {
			seen[p] = struct{}{}
			t.dirty[p] = struct{}{}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, p := range w.index.Paths() {
		if _, ok := seen[p]; !ok {
			w.index.RemoveFile(p)
		}
	}
	t.flush(ctx)
	w.mu.Lock()
	w.status.Scans++
	w.status.LastScan = time.Now()
	w.status.DataDir = t.dataDir
	w.status.Files = w.index.Files()
	w.mu.Unlock()
	w.log.Info("indexed the data directory", "data_dir", t.dataDir, "files", len(seen), "index_bytes", w.index.MemoryBytes())
	return nil
}

const watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF

func (t *tree) addWatch(dir string) {
	wd, err := unix.InotifyAddWatch(t.fd, dir, watchMask)
	if err != nil {
		t.w.log.Warn("cannot watch directory; its files are indexed at the next rescan", "dir", dir, "err", err)
		return
	}
	t.wds[int32(wd)] = dir
}

// loadTablespaces maps pg_tblspc/<oid> link targets on this mount to OIDs.
func (t *tree) loadTablespaces() {
	t.spcDirs = map[string]uint32{}
	if t.dataDir == "" {
		return
	}
	for dir, o := range Tablespaces(t.dataDir) {
		if strings.HasPrefix(dir, t.w.cfg.Mount+"/") {
			t.spcDirs[dir] = o
		}
	}
}

// classify names the owner of the file at absolute path p.
func (t *tree) classify(p string) layout.Owner {
	if t.dataDir != "" {
		if rel, err := filepath.Rel(t.dataDir, p); err == nil && !strings.HasPrefix(rel, "..") {
			return ParsePath(filepath.ToSlash(rel))
		}
	}
	for dir, o := range t.spcDirs {
		if strings.HasPrefix(p, dir+"/") {
			return ParsePath("pg_tblspc/" + strconv.FormatUint(uint64(o), 10) + "/" + filepath.ToSlash(p[len(dir)+1:]))
		}
	}
	return layout.Owner{Kind: layout.KindVolume}
}

// events handles a buffer of inotify events; it returns true when the
// filesystem went away.
func (t *tree) events(b []byte) (unmounted bool) {
	le := binary.LittleEndian
	for len(b) >= unix.SizeofInotifyEvent {
		wd := int32(le.Uint32(b[0:]))
		mask := le.Uint32(b[4:])
		nl := int(le.Uint32(b[12:]))
		if unix.SizeofInotifyEvent+nl > len(b) {
			break
		}
		name := strings.TrimRight(string(b[unix.SizeofInotifyEvent:unix.SizeofInotifyEvent+nl]), "\x00")
		b = b[unix.SizeofInotifyEvent+nl:]
		t.w.mu.Lock()
		t.w.status.Events++
		t.w.mu.Unlock()
		if mask&unix.IN_Q_OVERFLOW != 0 {
			t.overflow = true
			continue
		}
		if mask&unix.IN_UNMOUNT != 0 {
			return true
		}
		dir, ok := t.wds[wd]
		if !ok {
			continue
		}
		if mask&unix.IN_IGNORED != 0 {
			delete(t.wds, wd)
			continue
		}
		if name == "" {
			continue
		}
		p := filepath.Join(dir, name)
		isDir := mask&unix.IN_ISDIR != 0
		switch {
		case mask&(unix.IN_DELETE|unix.IN_MOVED_FROM) != 0 && !isDir:
			delete(t.dirty, p)
			delete(t.mapped, p)
			t.w.index.RemoveFile(p)
		case mask&(unix.IN_DELETE|unix.IN_MOVED_FROM) != 0:
			// A directory went: forget every file under it.
			for _, f := range t.w.index.Paths() {
				if strings.HasPrefix(f, p+"/") {
					delete(t.dirty, f)
					delete(t.mapped, f)
					t.w.index.RemoveFile(f)
				}
			}
		case isDir && mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0:
			// Watch it and pick up what was created before the watch.
			filepath.WalkDir(p, func(q string, d fs.DirEntry, err error) error {
				if err != nil {
					return nil
				}
				if d.IsDir() {
					t.addWatch(q)
				} else if d.Type().IsRegular() {
					t.dirty[q] = struct{}{}
				}
				return nil
			})
			if strings.HasSuffix(dir, "/pg_tblspc") || t.dataDir == "" {
				t.rescanDue = true
			}
		case isDir:
		default:
			if name == "PG_VERSION" && t.dataDir == "" || strings.HasSuffix(dir, "/pg_tblspc") {
				t.rescanDue = true // a data directory or tablespace appeared
			}
			t.dirty[p] = struct{}{}
		}
	}
	return false
}

// flush maps every changed file and publishes it: keys first, so the
// writes that follow take them inline.
func (t *tree) flush(ctx context.Context) {
	if len(t.dirty) == 0 {
		return
	}
	paths := make([]string, 0, len(t.dirty))
	for p := range t.dirty {
		paths = append(paths, p)
	}
	t.dirty = map[string]struct{}{}
	sort.Strings(paths)
	type file struct {
		path  string
		owner layout.Owner
		shape [2]int64
	}
	var files []file
	var rels []layout.RelKey
	wal := false
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.w.index.RemoveFile(p)
			delete(t.mapped, p)
			continue
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Dev != t.dev {
			continue
		}
		shape := [2]int64{st.Size, st.Blocks}
		if old, ok := t.mapped[p]; ok && old == shape {
			if _, retry := t.needKey[p]; !retry {
				continue // rewritten in place: same extents
			}
		}
		o := t.classify(p)
		files = append(files, file{p, o, shape})
		switch o.Kind {
		case layout.KindRelation:
			rels = append(rels, o.Rel)
		case layout.KindWAL:
			wal = true
		}
	}
	// Keys first, in one batch (one sync), so the writes that follow the
	// index update take them inline.
	var keyErr error
	if len(rels) > 0 {
		keyErr = t.w.cfg.Volume.EnsureRelationKeys(ctx, rels)
	}
	if wal {
		if _, err := t.w.cfg.Volume.EnsureWALKey(ctx); err != nil && keyErr == nil {
			keyErr = err
		}
	}
	if keyErr != nil {
		if len(t.needKey) == 0 {
			t.w.log.Warn("cannot create data keys yet; those files' blocks use the volume key until the rekeyer can move them", "err", keyErr)
		}
		for _, f := range files {
			if f.owner.Kind != layout.KindVolume {
				t.needKey[f.path] = struct{}{}
			}
		}
	} else {
		for _, f := range files {
			delete(t.needKey, f.path)
		}
	}
	for _, f := range files {
		ext, err := Extents(f.path)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				t.w.log.Debug("cannot map file", "path", f.path, "err", err)
			}
			continue
		}
		t.w.index.SetFile(f.path, f.owner, ext)
		t.mapped[f.path] = f.shape
	}
	t.w.mu.Lock()
	t.w.status.Files = t.w.index.Files()
	t.w.mu.Unlock()
}

// retryKeys retries key creation that failed (KMS unreachable, say).
func (t *tree) retryKeys(ctx context.Context) {
	for p := range t.needKey {
		t.dirty[p] = struct{}{}
	}
}

// shredCheck starts, cancels and completes grace periods of relations
// that have a key but no file. Only while the mount is followed and the
// data directory is found: an unmounted or foreign tree shreds nothing.
func (w *Watcher) shredCheck(ctx context.Context, haveDataDir bool) {
	if w.cfg.ShredGrace < 0 || !haveDataDir {
		return
	}
	keys := w.cfg.Volume.RelationKeys()
	files := w.index.Relations()
	now := time.Now()
	var due []layout.RelKey
	w.mu.Lock()
	for r := range w.gone {
		if _, ok := files[r]; ok {
			delete(w.gone, r) // back (a restored file)
		} else if _, ok := keys[r]; !ok {
			delete(w.gone, r) // shredded or rotated away
		}
	}
	for r := range keys {
		if _, ok := files[r]; ok {
			continue
		}
		since, ok := w.gone[r]
		if !ok {
			w.gone[r] = now
			continue
		}
		if now.Sub(since) >= w.cfg.ShredGrace {
			due = append(due, r)
		}
	}
	w.mu.Unlock()
	for _, r := range due {
		if w.cfg.Catalog != nil {
			known, err := w.cfg.Catalog.Known(ctx, r)
			if err != nil || known {
				if err != nil {
					w.log.Warn("catalog check failed; shred postponed", "relation", r, "err", err)
				}
				continue
			}
		}
		slot := keys[r]
		if err := w.cfg.Volume.Retire(ctx, slot, false); err != nil {
			w.log.Warn("shred failed; retrying", "relation", r, "err", err)
			continue
		}
		w.log.Info("crypto-shredding: relfilenode's files gone past the grace period; its key is retiring", "tablespace", r.Tablespace, "database", r.Database, "relfilenode", r.RelNode, "slot", slot)
		w.mu.Lock()
		delete(w.gone, r)
		w.mu.Unlock()
	}
}
