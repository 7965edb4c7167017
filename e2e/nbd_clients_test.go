package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestNbdinfoShowsHonestFlags(t *testing.T) {
	need(t, "nbdinfo")
	f := newVolume(t, "64M")
	s := startServe(t, f)
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	out := mustRun(t, 30*time.Second, "nbdinfo", "--json", s.uri())
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	e := info.Exports[0]
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_fast_zero", "can_df"} {
		if e[k] != true {
			t.Errorf("%s = %v, want true", k, e[k])
		}
	}
	if e["is_read_only"] != false || e["block_size_minimum"] != float64(512) || e["block_size_preferred"] != float64(4096) {
		t.Errorf("read-only/block sizes wrong: %v %v %v", e["is_read_only"], e["block_size_minimum"], e["block_size_preferred"])
	}
	if ctx, _ := e["contexts"].([]any); len(ctx) != 1 || ctx[0] != "base:allocation" {
		t.Errorf("contexts = %v", e["contexts"])
	}
	if err := s.stop(t); err != nil {
		t.Fatalf("serve did not exit 0 on SIGTERM: %v\n%s", err, s.log)
	}

	ro := startServe(t, f, "--read-only")
	out = mustRun(t, 30*time.Second, "nbdinfo", "--json", ro.uri())
	json.Unmarshal([]byte(out), &info)
	e = info.Exports[0]
	if e["is_read_only"] != true || e["can_trim"] != false || e["can_zero"] != false || e["can_fua"] != false {
		t.Errorf("read-only export advertises writes: %v", out)
	}
}

func TestQemuIOPatternsFlushDiscardZero(t *testing.T) {
	need(t, "qemu-io", "nbdinfo")
	f := newVolume(t, "64M")
	s := startServe(t, f)
	// qemu-io exits 0 for flush/discard/zero even if never advertised:
	// check the flags first.
	for _, can := range []string{"flush", "trim", "zero", "fua"} {
		if _, err := run(t, 30*time.Second, "nbdinfo", "--can", can, s.uri()); err != nil {
			t.Fatalf("nbdinfo --can %s: not advertised (%v)", can, err)
		}
	}
	cmds := []string{
		"write -P 0xab 0 1M",
		"write -P 0xcd 1M 64k",
		"write -f -P 0xee 4M 8k", // FUA
		"flush",
		"read -P 0xab 0 1M",
		"read -P 0xcd 1M 64k",
		"read -P 0xee 4M 8k",
		"discard 0 64k",
		"read -P 0 0 64k",
		"write -z 2M 1M",
		"read -P 0 2M 1M",
		"write -z -u 1M 64k",
		"read -P 0 1M 64k",
		"write -P 0x11 70k 512", // sub-block: read-modify-write
		"read -P 0x11 70k 512",
		"read -P 0xab 69k 1k",
		"read -P 0xab 72192 1536",
		"flush",
	}
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := mustRun(t, time.Minute, "qemu-io", append(append([]string{"-f", "raw"}, args...), s.uri())...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io verification failed:\n%s", out)
	}
	// Discarded and unmapped ranges are holes in the map.
	m := mustRun(t, 30*time.Second, "nbdinfo", "--map", s.uri())
	if !strings.Contains(m, "hole,zero") {
		t.Fatalf("no hole in map after discard:\n%s", m)
	}
}

func TestNbdcopyRoundTripsOneGiB(t *testing.T) {
	need(t, "nbdcopy")
	if testing.Short() {
		t.Skip("1 GiB copy skipped in -short mode")
	}
	f := newVolume(t, "1G")
	s := startServe(t, f)
	src := filepath.Join(f.dir, "random.bin")
	writeRandom(t, src, 1<<30, 42)
	mustRun(t, 5*time.Minute, "nbdcopy", "--flush", src, s.uri())
	dst := filepath.Join(f.dir, "back.bin")
	mustRun(t, 5*time.Minute, "nbdcopy", s.uri(), dst)
	if a, b := fileSHA(t, src), fileSHA(t, dst); a != b {
		t.Fatalf("1 GiB round trip differs: %x vs %x", a, b)
	}
	os.Remove(dst)
	// The plaintext is not in the backing file: take 64-byte samples.
	r, _ := os.Open(src)
	defer r.Close()
	var samples []string
	for i := int64(0); i < 8; i++ {
		b := make([]byte, 64)
		r.ReadAt(b, i*(1<<27)+12345)
		samples = append(samples, string(b))
	}
	s.stop(t)
	scanFor(t, f.path, samples...)
}

func TestQemuImgBenchWithFlushes(t *testing.T) {
	need(t, "qemu-img", "qemu-io")
	f := newVolume(t, "64M")
	s := startServe(t, f)
	mustRun(t, 2*time.Minute, "qemu-img", "bench", "-f", "raw", "-w", "-c", "4000", "-d", "16",
		"--flush-interval=64", "-s", "4k", "--pattern=0x5a", s.uri())
	out := mustRun(t, time.Minute, "qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 16000k", s.uri())
	if strings.Contains(out, "failed") {
		t.Fatalf("bench data did not read back:\n%s", out)
	}
}

func writeRandom(t *testing.T, path string, size int64, seed int64) {
	t.Helper()
	w, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rng := rand.New(rand.NewSource(seed))
	if _, err := io.CopyN(w, rng, size); err != nil {
		t.Fatal(err)
	}
}

func fileSHA(t *testing.T, path string) [32]byte {
	t.Helper()
	r, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := sha256.New()
	io.Copy(h, r)
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}
