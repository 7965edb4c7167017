package nbd

import (
	"errors"
	"fmt"
)

// Device is what the server exports. Offsets and lengths reach it already
// checked against Size and the 512-byte minimum block size.
type Device interface {
	Size() int64
	ReadOnly() bool
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64, fua bool) error
	Trim(off, n int64, fua bool) error
	Zero(off, n int64, noHole, fast, fua bool) error
	// Flush makes every write that completed before it durable, whichever
	// connection sent it; that is what lets the server advertise multi-conn.
	Flush() error
	// Extents describes allocation of [off, off+n), at most max extents.
	Extents(off, n int64, max int) ([]Extent, error)
}

// Extent is a run of the export that is either data or a hole reading as
// zeros.
type Extent struct {
	Length uint64
	Hole   bool
}

// Error carries an NBD error code out of a Device.
type Error struct {
	Code uint32
	Err  error
}

func (e *Error) Error() string { return fmt.Sprintf("nbd error %d: %v", e.Code, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// codeOf maps a device error to the reply code; anything unclassified is
// an I/O error.
func codeOf(err error) uint32 {
	var ne *Error
	if errors.As(err, &ne) {
		return ne.Code
	}
	return EIO
}
