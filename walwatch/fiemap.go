package walwatch

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tdeshim/tdeshim/layout"
)

// FIEMAP (linux/fiemap.h): struct fiemap is 32 bytes, each struct
// fiemap_extent 56; x/sys/unix has the ioctl number but not the structs.
const (
	fiemapHeader     = 32
	fiemapExtentSize = 56
	fiemapBatch      = 256
	fsIocFiemap      = 0xC020660B // _IOWR('f', 11, struct fiemap)

	extentLast       = 0x0001
	extentUnknown    = 0x0002 // no physical location yet
	extentDelalloc   = 0x0004
	extentNotAligned = 0x0100
	extentInline     = 0x0200 // data in the inode: no block of its own
)

// FileExtent is one mapped run of a file, in bytes.
type FileExtent struct {
	Logical, Physical, Length uint64
}

// Extents maps the file at path to device blocks (4 KiB) with FIEMAP. It
// does not ask the filesystem to sync: extents not yet allocated
// (delayed allocation) are skipped, and the next event maps them.
func Extents(path string) ([]layout.IndexExtent, error) {
	fe, err := FileExtents(path)
	if err != nil {
		return nil, err
	}
	var out []layout.IndexExtent
	for _, e := range fe {
		b0 := e.Physical / layout.BlockSize
		b1 := (e.Physical + e.Length + layout.BlockSize - 1) / layout.BlockSize
		if k := len(out); k > 0 && out[k-1].Start+out[k-1].Len == b0 {
			out[k-1].Len += b1 - b0
		} else {
			out = append(out, layout.IndexExtent{Start: b0, Len: b1 - b0})
		}
	}
	return out, nil
}

// FileExtents lists the allocated extents of the file at path (FIEMAP,
// no sync), skipping those without a device location of their own.
func FileExtents(path string) ([]FileExtent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, fiemapHeader+fiemapBatch*fiemapExtentSize)
	le := binary.LittleEndian
	var out []FileExtent
	start := uint64(0)
	for {
		clear(buf)
		le.PutUint64(buf[0:], start)
		le.PutUint64(buf[8:], ^uint64(0)-start)
		le.PutUint32(buf[24:], fiemapBatch)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
			return nil, fmt.Errorf("walwatch: FIEMAP %s: %w", path, e)
		}
		n := int(le.Uint32(buf[20:]))
		if n == 0 {
			return out, nil
		}
		last := false
		for i := 0; i < n; i++ {
			e := buf[fiemapHeader+i*fiemapExtentSize:]
			logical, phys, length := le.Uint64(e[0:]), le.Uint64(e[8:]), le.Uint64(e[16:])
			flags := le.Uint32(e[40:])
			start = logical + length
			if flags&extentLast != 0 {
				last = true
			}
			if flags&(extentUnknown|extentDelalloc|extentInline|extentNotAligned) != 0 || length == 0 {
				continue
			}
			out = append(out, FileExtent{Logical: logical, Physical: phys, Length: length})
		}
		if last {
			return out, nil
		}
	}
}
