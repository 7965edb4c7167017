package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/attach"
	"github.com/tdeshim/tdeshim/nbd"
)

// TestClientHandshakeWithNbdkit: the handshake `attach --via kernel` does
// before handing sockets to the kernel, against the reference server.
func TestClientHandshakeWithNbdkit(t *testing.T) {
	need(t, "nbdkit")
	dir := t.TempDir()
	sock, pidf := filepath.Join(dir, "k.sock"), filepath.Join(dir, "k.pid")
	// nbdkit daemonizes with -P (Debian's stops serving if its parent dies).
	mustRun(t, 30*time.Second, "nbdkit", "-U", sock, "-P", pidf, "memory", "size=64M")
	t.Cleanup(func() {
		if b, err := os.ReadFile(pidf); err == nil {
			var pid int
			for _, c := range strings.TrimSpace(string(b)) {
				pid = pid*10 + int(c-'0')
			}
			syscall.Kill(pid, syscall.SIGTERM)
		}
	})
	var c net.Conn
	var err error
	for i := 0; i < 100; i++ {
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ex, err := nbd.ClientHandshake(c, "")
	if err != nil {
		t.Fatalf("handshake with nbdkit: %v", err)
	}
	if ex.Size != 64<<20 || ex.Flags&1 == 0 {
		t.Fatalf("nbdkit export %+v", ex)
	}
}

// TestKernelNBDAttach needs the nbd kernel module; this project's machines
// have none, so it skips there and says so.
func TestKernelNBDAttach(t *testing.T) {
	needRoot(t)
	if err := attach.KernelAvailable(); err != nil {
		t.Skipf("kernel NBD path not tested on this machine: %v", err)
	}
	need(t, "mkfs.ext4")
	f := newVolume(t, "256M")
	s := startServe(t, f)
	dev := strings.TrimSpace(mustRun(t, time.Minute, tdeshimBin, "attach", "--socket", s.socket, "--via", "kernel"))
	t.Cleanup(func() { exec.Command(tdeshimBin, "detach", dev).Run() })
	if !strings.HasPrefix(dev, "/dev/nbd") {
		t.Fatalf("attach printed %q", dev)
	}
	mustRun(t, time.Minute, "mkfs.ext4", "-q", "-F", "-b", "4096", dev)
	mnt := mountExt4(t, dev)
	os.WriteFile(filepath.Join(mnt, "f"), []byte("kernel path"), 0o600)
	umount(t, mnt)
	mustRun(t, time.Minute, tdeshimBin, "detach", dev)
}
