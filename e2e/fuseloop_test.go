package e2e

import (
	"bytes"
	"crypto/sha256"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// attachFuseLoop runs `tdeshim attach --via fuse-loop` and registers the
// detach. It returns the loop device.
func attachFuseLoop(t *testing.T, s *server) string {
	t.Helper()
	needRoot(t)
	need(t, "nbdfuse", "losetup", "fusermount3")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse on this machine")
	}
	mdir := filepath.Join(filepath.Dir(s.socket), "fuse")
	dev := strings.TrimSpace(mustRun(t, time.Minute, tdeshimBin, "attach", "--socket", s.socket, "--via", "fuse-loop", "--mount-dir", mdir))
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("attach printed %q, want a loop device", dev)
	}
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join("/sys/block", filepath.Base(dev), "loop")); err != nil {
			return // the test detached it already
		}
		if out, err := run(t, time.Minute, tdeshimBin, "detach", dev); err != nil {
			t.Errorf("detach %s: %v\n%s", dev, err, out)
			exec.Command("losetup", "-d", dev).Run()
			exec.Command("fusermount3", "-u", mdir).Run()
		}
	})
	return dev
}

// mountExt4 mounts dev on a new directory with the options tdeshim
// expects, unmounting in cleanup.
func mountExt4(t *testing.T, dev string) string {
	t.Helper()
	dir := t.TempDir()
	mustRun(t, time.Minute, "mount", "-o", "nodelalloc,discard", dev, dir)
	t.Cleanup(func() {
		if out, err := run(t, time.Minute, "umount", dir); err != nil && !strings.Contains(out, "not mounted") {
			t.Errorf("umount %s: %v %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
	return dir
}

func umount(t *testing.T, dir string) {
	t.Helper()
	mustRun(t, time.Minute, "umount", dir)
}

// TestExt4OverFuseLoopSurvivesRemount: mkfs, fsync'd files, unmount,
// detach, stop serve, start again, reattach, remount: same bytes. nbdfuse
// spreads requests over 4 connections and flushes on any of them, so this
// is the multi-conn rule tested for real. No canary reaches the backing
// file.
func TestExt4OverFuseLoopSurvivesRemount(t *testing.T) {
	need(t, "mkfs.ext4")
	f := newVolume(t, "512M")
	s := startServe(t, f)
	dev := attachFuseLoop(t, s)
	mustRun(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", "-b", "4096", dev)
	mnt := mountExt4(t, dev)

	canary := "CANARY-ext4-secret-row-7c1d"
	files := map[string][]byte{
		"small.txt": []byte(strings.Repeat(canary+"\n", 100)),
		"big.bin":   bytes.Repeat([]byte(canary+"-big-"), (24<<20)/len(canary+"-big-")),
	}
	sums := map[string][32]byte{}
	for name, data := range files {
		p := filepath.Join(mnt, name)
		w, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
		if err := w.Sync(); err != nil {
			t.Fatalf("fsync %s: %v", name, err)
		}
		w.Close()
		sums[name] = sha256.Sum256(data)
	}
	os.Remove(filepath.Join(mnt, "small.txt")) // discard path: freed blocks get trimmed
	delete(sums, "small.txt")
	mustRun(t, time.Minute, "fstrim", mnt)
	umount(t, mnt)
	mustRun(t, time.Minute, tdeshimBin, "detach", dev)
	if err := s.stop(t); err != nil {
		t.Fatalf("serve exit: %v\n%s", err, s.log)
	}
	scanFor(t, f.path, canary)

	s2 := startServe(t, f)
	dev2 := attachFuseLoop(t, s2)
	mustRun(t, 2*time.Minute, "e2fsck", "-f", "-n", dev2)
	mnt2 := mountExt4(t, dev2)
	for name, want := range sums {
		got, err := os.ReadFile(filepath.Join(mnt2, name))
		if err != nil || sha256.Sum256(got) != want {
			t.Fatalf("%s after remount: err=%v, content differs", name, err)
		}
	}
}
