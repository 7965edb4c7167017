package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFullBackingDiskGivesENOSPCAndLosesNothing(t *testing.T) {
	needRoot(t)
	need(t, "/usr/bin/python3")
	dir := t.TempDir()
	mustRun(t, time.Minute, "mount", "-t", "tmpfs", "-o", "size=40m", "tdeshim-full", dir)
	t.Cleanup(func() {
		if out, err := run(t, time.Minute, "umount", dir); err != nil {
			t.Errorf("umount tmpfs: %v %s", err, out)
		}
	})
	f := &volumeFixture{dir: dir, path: filepath.Join(dir, "vol.img"), key: filepath.Join(dir, "k")}
	mustRun(t, time.Minute, tdeshimBin, "init", "--volume", f.path, "--size", "128M", "--key-file", f.key)
	s := startServe(t, f)
	out, err := run(t, 2*time.Minute, "/usr/bin/python3", "testdata/fill_disk.py", s.uri())
	if err != nil || !strings.HasPrefix(out, "ok") {
		t.Fatalf("fill disk: %v\n%s\n%s", err, out, s.log)
	}
	if err := s.stop(t); err != nil {
		t.Fatalf("serve after ENOSPC did not shut down cleanly: %v\n%s", err, s.log)
	}
	st := mustRun(t, time.Minute, tdeshimBin, "status", "--volume", f.path)
	if !strings.Contains(st, "clean") {
		t.Fatalf("volume not clean after ENOSPC run:\n%s", st)
	}
}

func TestCLIErrorsSayWhatToDo(t *testing.T) {
	f := newVolume(t, "16M")
	// Refuses to overwrite.
	out, err := run(t, time.Minute, tdeshimBin, "init", "--volume", f.path, "--size", "16M", "--key-file", f.key)
	if err == nil || !strings.Contains(out, "already a tdeshim volume") || !strings.Contains(out, "--force") {
		t.Fatalf("init over a volume: %v\n%s", err, out)
	}
	// Wrong key.
	other := filepath.Join(f.dir, "other.key")
	mustRun(t, time.Minute, tdeshimBin, "init", "--volume", filepath.Join(f.dir, "v2"), "--size", "16M", "--key-file", other)
	out, err = run(t, time.Minute, tdeshimBin, "serve", "--volume", f.path, "--listen", "unix:"+filepath.Join(f.dir, "x.sock"), "--key-file", other)
	if err == nil || !strings.Contains(out, "key does not open this volume") {
		t.Fatalf("serve with the wrong key: %v\n%s", err, out)
	}
	if strings.Contains(out, "goroutine") || strings.Contains(out, "panic") {
		t.Fatalf("stack trace instead of an error:\n%s", out)
	}
	// Non-loopback TCP is refused.
	out, err = run(t, time.Minute, tdeshimBin, "serve", "--volume", f.path, "--listen", "tcp:0.0.0.0:0")
	if err == nil || !strings.Contains(out, "--allow-remote-plaintext") {
		t.Fatalf("serve on 0.0.0.0: %v\n%s", err, out)
	}
	// A damaged header copy is survivable; both are not, with a clear error.
	raw, _ := os.ReadFile(f.path)
	img := filepath.Join(f.dir, "damaged.img")
	raw[100] ^= 0xff
	os.WriteFile(img, raw, 0o600)
	mustRun(t, time.Minute, tdeshimBin, "status", "--volume", img)
	raw[4096+100] ^= 0xff
	os.WriteFile(img, raw, 0o600)
	out, err = run(t, time.Minute, tdeshimBin, "status", "--volume", img)
	if err == nil || !strings.Contains(out, "corrupt") || !strings.Contains(out, "backup") {
		t.Fatalf("status of a volume with both headers damaged: %v\n%s", err, out)
	}
	// Not a volume at all.
	junk := filepath.Join(f.dir, "junk")
	os.WriteFile(junk, make([]byte, 1<<20), 0o600)
	out, err = run(t, time.Minute, tdeshimBin, "serve", "--volume", junk, "--listen", "unix:"+filepath.Join(f.dir, "y.sock"))
	if err == nil || !strings.Contains(out, "not a tdeshim volume") {
		t.Fatalf("serve of a non-volume: %v\n%s", err, out)
	}
	// Truncated copy.
	trunc := filepath.Join(f.dir, "trunc.img")
	raw, _ = os.ReadFile(f.path)
	os.WriteFile(trunc, raw[:len(raw)/2], 0o600)
	out, err = run(t, time.Minute, tdeshimBin, "status", "--volume", trunc)
	if err == nil || !strings.Contains(out, "truncated") {
		t.Fatalf("status of a truncated copy: %v\n%s", err, out)
	}
	// Two servers on one volume.
	s := startServe(t, f)
	out, err = run(t, time.Minute, tdeshimBin, "serve", "--volume", f.path, "--listen", "unix:"+filepath.Join(f.dir, "z.sock"))
	if err == nil || !strings.Contains(out, "in use") {
		t.Fatalf("second serve: %v\n%s", err, out)
	}
	_ = s
}

func TestStatusJSONContract(t *testing.T) {
	f := newVolume(t, "32M")
	out := mustRun(t, time.Minute, tdeshimBin, "status", "--volume", f.path, "--json")
	var st map[string]any
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	for _, k := range []string{"uuid", "size_bytes", "cipher", "clean", "key_slots", "blocks", "journal", "provider"} {
		if _, ok := st[k]; !ok {
			t.Errorf("status --json lacks %q", k)
		}
	}
	if st["size_bytes"] != float64(32<<20) {
		t.Errorf("size_bytes = %v", st["size_bytes"])
	}
	if strings.Contains(out, "BEGIN") || strings.Contains(strings.ToLower(out), "secret") {
		t.Errorf("status shows key material:\n%s", out)
	}
}
