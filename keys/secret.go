package keys

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"sync"

	"golang.org/x/sys/unix"
)

// Secret is key material in memory that is locked (never swapped), excluded
// from core dumps, and zeroed by Wipe. It is never formatted or logged:
// String returns a placeholder.
type Secret struct {
	mu  sync.Mutex
	mem []byte // page-aligned mapping
	n   int
}

var mlockWarn sync.Once

// NewSecret allocates n bytes of locked memory.
func NewSecret(n int) (*Secret, error) {
	size := (n + unix.Getpagesize() - 1) / unix.Getpagesize() * unix.Getpagesize()
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		return nil, fmt.Errorf("keys: allocate secret: %w", err)
	}
	if err := unix.Mlock(mem); err != nil {
		// Without CAP_IPC_LOCK and a low RLIMIT_MEMLOCK this fails; keys
		// still work, but may be swapped. Say so once, loudly.
		mlockWarn.Do(func() {
			slog.Warn("cannot lock key memory; keys may reach swap (run as root or raise RLIMIT_MEMLOCK)", "err", err)
		})
	}
	_ = unix.Madvise(mem, unix.MADV_DONTDUMP)
	return &Secret{mem: mem, n: n}, nil
}

// RandomSecret returns n random bytes in locked memory.
func RandomSecret(n int) (*Secret, error) {
	s, err := NewSecret(n)
	if err != nil {
		return nil, err
	}
	if _, err := rand.Read(s.Bytes()); err != nil {
		s.Wipe()
		return nil, err
	}
	return s, nil
}

// SecretFrom copies b into locked memory and zeroes b.
func SecretFrom(b []byte) (*Secret, error) {
	s, err := NewSecret(len(b))
	if err != nil {
		return nil, err
	}
	copy(s.Bytes(), b)
	clear(b)
	return s, nil
}

// Bytes is the key material. It stays valid until Wipe.
func (s *Secret) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil {
		return nil
	}
	return s.mem[:s.n]
}

// Wipe zeroes and unmaps the memory. Safe to call twice.
func (s *Secret) Wipe() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil {
		return
	}
	clear(s.mem)
	_ = unix.Munlock(s.mem)
	_ = unix.Munmap(s.mem)
	s.mem = nil
}

// String keeps key bytes out of logs and error messages.
func (s *Secret) String() string { return "[secret]" }

// GoString likewise, for %#v.
func (s *Secret) GoString() string { return "[secret]" }

// HardenProcess makes the process non-dumpable: no core files, and no
// ptrace or /proc/PID/mem reads by other unprivileged processes.
func HardenProcess() error {
	return unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
}
