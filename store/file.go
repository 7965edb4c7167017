package store

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// File is a backing file or block device. Writes go through the page cache
// and Sync is fdatasync, the same durability a database expects of a disk.
type File struct {
	f        *os.File
	size     int64
	readOnly bool
	noPunch  atomic.Bool
}

// ErrLocked means another process (a running serve) holds the volume.
var ErrLocked = errors.New("store: volume is in use by another process")

// OpenFile opens path and takes an exclusive (or, read-only, shared) lock on
// it, so two servers can never write one volume.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	lock := unix.LOCK_EX
	if readOnly {
		flag, lock = os.O_RDONLY, unix.LOCK_SH
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), lock|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("%s: lock: %w", path, err)
	}
	size, err := f.Seek(0, 2) // works for regular files and block devices
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: size: %w", path, err)
	}
	return &File{f: f, size: size, readOnly: readOnly}, nil
}

// CreateFile creates a sparse regular file of size bytes, or opens an
// existing block device (whose size must be at least size).
func CreateFile(path string, size int64) (*File, error) {
	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
		f, err := OpenFile(path, false)
		if err != nil {
			return nil, err
		}
		if f.size < size {
			f.Close()
			return nil, fmt.Errorf("%s: device holds %d bytes, volume needs %d", path, f.size, size)
		}
		return f, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	f.Close()
	return OpenFile(path, false)
}

func (s *File) ReadAt(p []byte, off int64) (int, error)  { return s.f.ReadAt(p, off) }
func (s *File) WriteAt(p []byte, off int64) (int, error) { return s.f.WriteAt(p, off) }
func (s *File) Size() int64                              { return s.size }
func (s *File) Close() error                             { return s.f.Close() }

// Sync is fdatasync: data and the metadata needed to read it back.
func (s *File) Sync() error {
	if s.readOnly {
		return nil
	}
	return unix.Fdatasync(int(s.f.Fd()))
}

// Punch deallocates with FALLOC_FL_PUNCH_HOLE, which also works on block
// devices (it discards or zeroes there). Where it is unsupported it does
// nothing, once and for all: the key map already says the range is free.
func (s *File) Punch(off, length int64) error {
	if s.noPunch.Load() || length == 0 {
		return nil
	}
	err := unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		s.noPunch.Store(true)
		return nil
	}
	return err
}

// ZeroRange makes [off, off+n) read as zeros: a punched hole where the file
// system allows it, written zeros otherwise (so it is a guarantee, unlike
// Punch).
func (s *File) ZeroRange(off, n int64) error {
	err := unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	const chunk = 1 << 20
	zero := make([]byte, chunk)
	for pos := off; pos < off+n; pos += chunk {
		if _, err := s.f.WriteAt(zero[:min(chunk, off+n-pos)], pos); err != nil {
			return err
		}
	}
	return nil
}

// Preallocate reserves backing space for [off, off+n) on a regular file, so
// later writes there cannot fail with ENOSPC. Block devices need nothing.
func (s *File) Preallocate(off, n int64) error {
	st, err := s.f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return err
	}
	err = unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return nil
	}
	return err
}

// OpenFileNoLock opens read-only without taking the lock, for inspecting
// a volume a running server holds.
func OpenFileNoLock(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	size, err := f.Seek(0, 2)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &File{f: f, size: size, readOnly: true}, nil
}
