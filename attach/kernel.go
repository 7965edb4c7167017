package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/Merovius/nbd/nbdnl"

	"github.com/tdeshim/tdeshim/nbd"
)

// ErrNoNBDModule means the kernel NBD client is not available here.
var ErrNoNBDModule = errors.New("the kernel has no nbd module loaded (try `modprobe nbd`); use --via fuse-loop")

// KernelAvailable reports whether the kernel NBD client can be used.
func KernelAvailable() error {
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		return ErrNoNBDModule
	}
	return nil
}

// Kernel attaches through the kernel NBD client, configured over the NBD
// netlink family (github.com/Merovius/nbd/nbdnl): conns connections, each
// negotiated here with OPT_GO, then handed to the kernel with the export's
// transmission flags (FLUSH, FUA, TRIM, read-only, multi-conn), 4 KiB
// blocks and a dead-connection timeout. The kernel thus knows which writes
// are durable. Returns /dev/nbdN.
func Kernel(ctx context.Context, socket string, conns int, readOnly bool) (string, error) {
	if err := KernelAvailable(); err != nil {
		return "", err
	}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close() // the kernel holds its own references
		}
	}()
	var ex nbd.Export
	for i := 0; i < max(conns, 1); i++ {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", socket)
		if err != nil {
			return "", fmt.Errorf("attach: connect %s: %w", socket, err)
		}
		e, err := nbd.ClientHandshake(c, "")
		if err != nil {
			c.Close()
			return "", fmt.Errorf("attach: %w", err)
		}
		if i > 0 && e.Flags&(1<<8) == 0 {
			c.Close()
			break // no multi-conn: one connection only
		}
		ex = e
		f, err := c.(*net.UnixConn).File()
		c.Close()
		if err != nil {
			return "", err
		}
		files = append(files, f)
	}
	flags := nbdnl.ServerFlags(ex.Flags)
	if readOnly {
		flags |= nbdnl.FlagReadOnly
	}
	idx, err := nbdnl.Connect(nbdnl.IndexAny, files, ex.Size, 0, flags,
		nbdnl.WithBlockSize(4096), nbdnl.WithTimeout(60*time.Second), nbdnl.WithDeadconnTimeout(120*time.Second))
	if err != nil {
		return "", fmt.Errorf("attach: kernel NBD connect: %w", err)
	}
	return fmt.Sprintf("/dev/nbd%d", idx), nil
}

// DetachKernel disconnects /dev/nbdN.
func DetachKernel(dev string) error {
	if err := KernelAvailable(); err != nil {
		return err
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(filepath.Base(dev), "nbd"), 10, 32)
	if err != nil {
		return fmt.Errorf("detach: %s is not /dev/nbdN", dev)
	}
	return nbdnl.Disconnect(uint32(n))
}
