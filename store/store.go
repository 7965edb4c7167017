// Package store is the backing store under a volume: a regular file, a block
// device, or (for tests) a memory image that models a volatile write cache.
// Every implementation passes the same conformance test (storetest).
//
// The contract is the one a disk gives: WriteAt may sit in a volatile cache
// until Sync returns; Punch deallocates a range, which then reads as zeros.
package store

import "errors"

// Store is the backing store of one volume.
type Store interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes every WriteAt and Punch that completed before it durable.
	Sync() error
	// Punch deallocates [off, off+length); the range then reads as zeros.
	// A store that cannot deallocate writes nothing and returns nil: the key
	// map, not the backing bytes, says what is free.
	Punch(off, length int64) error
	// Size is the usable size in bytes.
	Size() int64
	Close() error
}

// ErrClosed is returned by a store after Close, or after a modelled crash.
var ErrClosed = errors.New("store: closed")
