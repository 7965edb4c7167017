package walwatch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/tdeshim/tdeshim/internal/mounts"
)

// ext4 superblock (at byte 1024 of the device): the fields we read.
const (
	sbOffset       = 1024
	sbMagicOff     = 0x38
	sbLogBlockOff  = 0x18
	sbUUIDOff      = 0x68
	ext4Magic      = 0xEF53
	wantLogBlock   = 2 // 1024 << 2 = 4096
	superblockRead = 4096
)

// ErrNotMounted: nothing is mounted at the watched path (yet).
var ErrNotMounted = errors.New("walwatch: not mounted")

// DeviceReader reads the volume the filesystem should be on.
type DeviceReader interface {
	ReadAt(p []byte, off int64) error
}

// VerifyMount checks that dir is a mount point of an ext4 filesystem with
// 4 KiB blocks whose id (statfs f_fsid, which ext4 derives from its UUID)
// matches the superblock read through dev: the filesystem mounted there
// lives on this volume, so its FIEMAP offsets are our block numbers.
func VerifyMount(dir string, dev DeviceReader) error {
	dir = filepath.Clean(dir)
	ok, err := mounts.IsMountPoint(dir)
	if err != nil {
		return err
	}
	if !ok {
		return ErrNotMounted
	}
	sb := make([]byte, superblockRead)
	if err := dev.ReadAt(sb, 0); err != nil {
		return fmt.Errorf("walwatch: read the filesystem superblock through the volume: %w", err)
	}
	s := sb[sbOffset:]
	le := binary.LittleEndian
	if le.Uint16(s[sbMagicOff:]) != ext4Magic {
		return fmt.Errorf("walwatch: the volume holds no ext2/3/4 filesystem (no superblock magic); per-relation keys need ext4 on the volume")
	}
	if lb := le.Uint32(s[sbLogBlockOff:]); lb != wantLogBlock {
		return fmt.Errorf("walwatch: the filesystem's block size is %d bytes; per-relation keys need 4096 (mkfs.ext4 -b 4096)", 1024<<lb)
	}
	uuid := s[sbUUIDOff : sbUUIDOff+16]
	want := [2]int32{
		int32(le.Uint32(uuid[0:]) ^ le.Uint32(uuid[8:])),
		int32(le.Uint32(uuid[4:]) ^ le.Uint32(uuid[12:])),
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("walwatch: statfs %s: %w", dir, err)
	}
	if st.Type != unix.EXT4_SUPER_MAGIC {
		return fmt.Errorf("walwatch: %s is not ext4 (statfs type %#x)", dir, st.Type)
	}
	if st.Fsid.Val != want {
		return fmt.Errorf("walwatch: the filesystem mounted at %s (fsid %08x%08x) is not the one on this volume (UUID %x): refusing to map its files to our blocks", dir, uint32(st.Fsid.Val[0]), uint32(st.Fsid.Val[1]), uuid)
	}
	return nil
}

// findDataDir returns the PostgreSQL data directory at or below root (at
// most two levels down): the directory holding PG_VERSION and base/.
func findDataDir(root string) (string, bool) {
	var found string
	var walk func(dir string, depth int)
	walk = func(dir string, depth int) {
		if found != "" {
			return
		}
		if isDataDir(dir) {
			found = dir
			return
		}
		if depth == 0 {
			return
		}
		ents, err := os.ReadDir(dir)
		if err != nil {
			return
		}
		for _, e := range ents {
			if e.IsDir() && e.Name() != "lost+found" {
				walk(filepath.Join(dir, e.Name()), depth-1)
			}
		}
	}
	walk(root, 2)
	return found, found != ""
}

func isDataDir(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "PG_VERSION"))
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return false
	}
	fi, err := os.Stat(filepath.Join(dir, "base"))
	return err == nil && fi.IsDir()
}
