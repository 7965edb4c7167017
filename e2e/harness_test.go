// Package e2e drives the tdeshim binary with real NBD clients (nbdinfo,
// qemu-io, qemu-img, nbdcopy, nbdfuse + loop + ext4, the libnbd Python
// binding). Every process, mount and loop device a test creates is ended
// or released in t.Cleanup, on failure too.
//
// A missing tool skips its test with the reason, unless
// TDESHIM_E2E_REQUIRE=1 (set by .ci/run), where it fails: in CI a skip
// must never pass for a run.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/internal/scan"
)

var tdeshimBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tdeshim-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tdeshimBin = filepath.Join(dir, "tdeshim")
	build := exec.Command("go", "build", "-o", tdeshimBin, "../cmd/tdeshim")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building tdeshim:", err)
		os.Exit(1)
	}
	code := m.Run()
	stopSharedKMS()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need skips (or, in CI, fails) when a tool is missing.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			msg := fmt.Sprintf("%s not installed (apt-get install %s)", tool, aptName(tool))
			if os.Getenv("TDESHIM_E2E_REQUIRE") != "" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("TDESHIM_E2E_REQUIRE") != "" {
			t.Fatal("needs root (loop devices, mounts)")
		}
		t.Skip("needs root (loop devices, mounts)")
	}
}

func aptName(tool string) string {
	switch tool {
	case "nbdinfo", "nbdcopy", "nbdfuse", "nbdsh":
		return "libnbd-bin"
	case "qemu-io", "qemu-img":
		return "qemu-utils"
	case "fusermount3":
		return "fuse3"
	case "mkfs.ext4":
		return "e2fsprogs"
	}
	return tool
}

// run runs a command with a timeout and returns its combined output.
func run(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func mustRun(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := run(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// volumeFixture is a fresh volume and its key file.
type volumeFixture struct {
	dir, path, key string
}

func newVolume(t *testing.T, size string) *volumeFixture {
	t.Helper()
	dir := t.TempDir()
	f := &volumeFixture{dir: dir, path: filepath.Join(dir, "vol.img"), key: filepath.Join(dir, "principal.key")}
	mustRun(t, time.Minute, tdeshimBin, "init", "--volume", f.path, "--size", size, "--key-provider", "file", "--key-file", f.key)
	return f
}

// server is a running `tdeshim serve`.
type server struct {
	cmd    *exec.Cmd
	socket string
	log    *bytes.Buffer
	done   chan error
}

func (s *server) uri() string { return "nbd+unix:///?socket=" + s.socket }

// startServe starts serve on a unix socket and waits until it accepts.
// Cleanup sends SIGTERM, waits, and kills by PID if it does not exit.
func startServe(t *testing.T, f *volumeFixture, extra ...string) *server {
	t.Helper()
	sock := filepath.Join(f.dir, fmt.Sprintf("nbd-%d.sock", time.Now().UnixNano()))
	args := append([]string{"serve", "--volume", f.path, "--listen", "unix:" + sock}, extra...)
	cmd := exec.Command(tdeshimBin, args...)
	s := &server{cmd: cmd, socket: sock, log: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() { s.stop(t) })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return s
		}
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("serve exited early: %v\n%s", err, s.log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not listen within 20s\n%s", s.log)
		}
	}
}

// stop ends serve with SIGTERM and reports whether it exited 0.
func (s *server) stop(t *testing.T) error {
	if s.cmd.ProcessState != nil {
		return nil
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		s.done <- err
		return err
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		err := <-s.done
		s.done <- err
		t.Errorf("serve ignored SIGTERM for 30s; killed\n%s", s.log)
		return err
	}
}

// kill ends serve with SIGKILL: a crash.
func (s *server) kill() {
	s.cmd.Process.Kill()
	err := <-s.done
	s.done <- err
}

// scanFor fails the test if any canary occurs in the file at path.
func scanFor(t *testing.T, path string, canaries ...string) {
	t.Helper()
	needles := make([][]byte, len(canaries))
	for i, c := range canaries {
		needles[i] = []byte(c)
	}
	w, at, err := scan.First(path, needles...)
	if err != nil {
		t.Fatal(err)
	}
	if w >= 0 {
		t.Fatalf("canary %q found in plaintext in %s at offset %d", canaries[w], path, at)
	}
}
