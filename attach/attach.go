// Package attach turns a served NBD export into a local block device, by
// one of two routes:
//
//   - kernel: the kernel NBD client (/dev/nbdN), configured over netlink
//     with the export's flags (FLUSH, FUA, TRIM, read-only) so the kernel
//     knows what is durable. Needs the nbd module.
//   - fuse-loop: nbdfuse (libnbd-bin) exposes the export as a file, and a
//     loop device with direct I/O and 4 KiB sectors is bound to it. Works
//     where there is no nbd module (containers, this CI). Flushes and
//     discards pass through loop → FUSE → NBD.
//
// Both end in a block device path.
package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// fuseFile is the name of the file nbdfuse exposes inside its mount.
const fuseFile = "nbd"

// FuseLoop attaches the export on socket through nbdfuse and a loop
// device. mountDir is created if needed and must not be in use. conns is
// the number of NBD connections nbdfuse opens (the server advertises
// multi-conn, so flushes on any of them cover all).
func FuseLoop(ctx context.Context, socket, mountDir string, conns int, readOnly bool) (string, error) {
	for _, tool := range []string{"nbdfuse", "losetup", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("attach --via fuse-loop needs %s (apt-get install libnbd-bin fuse3 util-linux)", tool)
		}
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return "", errors.New("attach --via fuse-loop: /dev/fuse is missing (load the fuse module, or give the container --device /dev/fuse)")
	}
	if err := os.MkdirAll(mountDir, 0o700); err != nil {
		return "", err
	}
	pidFile := filepath.Join(filepath.Dir(mountDir), "."+filepath.Base(mountDir)+".nbdfuse.pid")
	os.Remove(pidFile)
	args := []string{"-C", strconv.Itoa(max(conns, 1)), "-P", pidFile}
	if readOnly {
		args = append(args, "-r")
	}
	args = append(args, filepath.Join(mountDir, fuseFile), "--unix", socket)
	cmd := exec.Command("nbdfuse", args...)
	// Its own session: nbdfuse outlives `tdeshim attach` and is ended by
	// unmounting (tdeshim detach), as its manual asks.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	logf, _ := os.CreateTemp("", "tdeshim-nbdfuse-*.log")
	if logf != nil {
		cmd.Stdout, cmd.Stderr = logf, logf
		defer os.Remove(logf.Name())
		defer logf.Close()
	}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("start nbdfuse: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(30 * time.Second)
	for {
		if b, err := os.ReadFile(pidFile); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			break
		}
		select {
		case err := <-exited:
			msg := ""
			if logf != nil {
				b, _ := os.ReadFile(logf.Name())
				msg = strings.TrimSpace(string(b))
			}
			return "", fmt.Errorf("nbdfuse exited before it was ready (%v): %s", err, msg)
		case <-deadline:
			cmd.Process.Kill()
			return "", errors.New("nbdfuse not ready after 30s")
		case <-ctx.Done():
			cmd.Process.Kill()
			return "", ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	os.Remove(pidFile)
	losetup := []string{"--direct-io=on", "--sector-size", "4096", "--find", "--show"}
	if readOnly {
		losetup = append(losetup, "--read-only")
	}
	out, err := exec.CommandContext(ctx, "losetup", append(losetup, filepath.Join(mountDir, fuseFile))...).CombinedOutput()
	if err != nil {
		unmountFuse(mountDir)
		return "", fmt.Errorf("losetup: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

// DetachFuseLoop releases a loop device made by FuseLoop and unmounts the
// nbdfuse file behind it, which ends nbdfuse (its connections close with a
// clean NBD disconnect).
func DetachFuseLoop(dev string) error {
	name := filepath.Base(dev)
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err != nil {
		return fmt.Errorf("detach %s: not a bound loop device: %w", dev, err)
	}
	backing := strings.TrimSpace(string(b))
	if filepath.Base(backing) != fuseFile {
		return fmt.Errorf("detach %s: backed by %s, not an nbdfuse file; use losetup -d", dev, backing)
	}
	// Flush the loop device's page cache (none with direct I/O, but be safe).
	if f, err := os.OpenFile(dev, os.O_RDONLY, 0); err == nil {
		f.Sync()
		f.Close()
	}
	if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
		return fmt.Errorf("losetup -d %s: %v: %s", dev, err, strings.TrimSpace(string(out)))
	}
	// The loop device releases its backing file asynchronously.
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(filepath.Join("/sys/block", name, "loop", "backing_file")); err != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return unmountFuse(filepath.Dir(backing))
}

func unmountFuse(dir string) error {
	var last error
	for i := 0; i < 50; i++ {
		out, err := exec.Command("fusermount3", "-u", dir).CombinedOutput()
		if err == nil {
			return nil
		}
		last = fmt.Errorf("fusermount3 -u %s: %v: %s", dir, err, strings.TrimSpace(string(out)))
		time.Sleep(100 * time.Millisecond)
	}
	return last
}
