package e2e

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ovh/kmip-go"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/kmipdev"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

// kms is a KMIP server under test: its address and the client's PKI.
type kms struct {
	addr  string
	certs kmipdev.Certs
	stop  func()
	start func() // restart on the same address (nil if unsupported)
}

func (k *kms) flags() []string {
	return []string{"--kmip-endpoint", k.addr, "--kmip-ca", k.certs.CA, "--kmip-cert", k.certs.ClientCert, "--kmip-key", k.certs.ClientKey}
}

func (k *kms) settings(name string) keys.KMIPSettings {
	return keys.KMIPSettings{Endpoints: []string{k.addr}, CA: k.certs.CA, Cert: k.certs.ClientCert, Key: k.certs.ClientKey, Principal: name, Timeout: 5 * time.Second}
}

func devKMS(t *testing.T) *kms {
	dir := t.TempDir()
	s, err := kmipdev.Start(dir, "127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	k := &kms{addr: s.Addr, certs: s.Certs}
	cur := s
	k.stop = func() {
		if cur != nil {
			cur.Close()
			cur = nil
		}
	}
	k.start = func() {
		var err error
		for i := 0; i < 50; i++ {
			if cur, err = kmipdev.Start(dir, k.addr, nil); err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("restart dev KMS: %v", err)
	}
	t.Cleanup(k.stop)
	return k
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// pyKMS starts PyKMIP's server (Debian python3-pykmip) for one test.
func pyKMS(t *testing.T) *kms {
	need(t, "pykmip-server")
	k, err := startPyKMIP(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.stop)
	return k
}

var (
	sharedOnce sync.Once
	sharedKMS  *kms
	sharedErr  error
	sharedDir  string
)

// sharedPyKMS is one PyKMIP server for all PostgreSQL tests of this run,
// stopped by TestMain.
func sharedPyKMS(t *testing.T) *kms {
	need(t, "pykmip-server")
	sharedOnce.Do(func() {
		sharedDir, sharedErr = os.MkdirTemp("", "tdeshim-pykmip")
		if sharedErr == nil {
			sharedKMS, sharedErr = startPyKMIP(sharedDir)
		}
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return sharedKMS
}

func stopSharedKMS() {
	if sharedKMS != nil {
		sharedKMS.stop()
	}
	if sharedDir != "" {
		os.RemoveAll(sharedDir)
	}
}

// startPyKMIP runs pykmip-server with ECDSA P-256 certificates, the TLS1.2
// suite, client auth and INFO logging (DEBUG would log key material).
func startPyKMIP(dir string) (*kms, error) {
	certs, err := kmipdev.EnsureCerts(dir)
	if err != nil {
		return nil, err
	}
	os.MkdirAll(filepath.Join(dir, "policy"), 0o700)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	host, port, _ := net.SplitHostPort(addr)
	conf := fmt.Sprintf(`[server]
hostname=%s
port=%s
certificate_path=%s
key_path=%s
ca_path=%s
auth_suite=TLS1.2
policy_path=%s
enable_tls_client_auth=True
logging_level=INFO
database_path=%s
`, host, port, certs.ServerCert, certs.ServerKey, certs.CA, filepath.Join(dir, "policy"), filepath.Join(dir, "pykmip.db"))
	cfg := filepath.Join(dir, "server.conf")
	os.WriteFile(cfg, []byte(conf), 0o600)
	cmd := exec.Command("pykmip-server", "-f", cfg, "-l", filepath.Join(dir, "server.log"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	k := &kms{addr: addr, certs: certs}
	k.stop = func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}
	for i := 0; ; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return k, nil
		}
		if i > 300 {
			k.stop()
			b, _ := os.ReadFile(filepath.Join(dir, "server.log"))
			return nil, fmt.Errorf("pykmip-server did not listen on %s:\n%s", addr, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestKMIPLifecycleDevServer(t *testing.T) { kmipLifecycle(t, devKMS(t), keys.WrapServer) }
func TestKMIPLifecyclePyKMIP(t *testing.T)    { kmipLifecycle(t, pyKMS(t), keys.WrapServer) }
func TestKMIPLocalWrapPyKMIP(t *testing.T)    { kmipLifecycle(t, pyKMS(t), keys.WrapLocal) }

// kmipLifecycle: init with a KMS key, serve, restart, rotate online,
// revoke and destroy the old key (the volume still opens), verify, then
// revoke the current key under a running serve: it suspends. No key byte
// ever reaches a log or an error message.
func kmipLifecycle(t *testing.T, k *kms, wrap string) {
	need(t, "qemu-io")
	ctx := context.Background()
	dir := t.TempDir()
	f := &volumeFixture{dir: dir, path: filepath.Join(dir, "vol.img")}
	var transcript strings.Builder
	cli := func(args ...string) string {
		t.Helper()
		out := mustRun(t, time.Minute, tdeshimBin, args...)
		transcript.WriteString(out)
		return out
	}
	ctl := filepath.Join(dir, "ctl")
	t.Setenv("TDESHIM_CONTROL_DIR", ctl)
	cli(append([]string{"init", "--volume", f.path, "--size", "64M", "--key-provider", "kmip", "--principal-key", "pg-main-" + wrap,
		"--create-principal-key", "--wrap", wrap, "--log-level", "debug"}, k.flags()...)...)
	serveArgs := []string{"--kms-check-interval", "300ms", "--control-dir", ctl, "--log-level", "debug"}
	s := startServe(t, f, serveArgs...)
	canary := "KMIP-CANARY-9f2e"
	qio := func(s *server, cmds ...string) (string, error) {
		var a []string
		for _, c := range cmds {
			a = append(a, "-c", c)
		}
		return run(t, time.Minute, "qemu-io", append(append([]string{"-f", "raw"}, a...), s.uri())...)
	}
	os.WriteFile(filepath.Join(dir, "canary"), []byte(strings.Repeat(canary, 256)), 0o600)
	if out, err := qio(s, "write -P 0x5c 0 64k", "flush"); err != nil {
		t.Fatalf("write: %v %s", err, out)
	}
	if err := s.stop(t); err != nil {
		t.Fatalf("serve stop: %v\n%s", err, s.log)
	}
	transcript.WriteString(s.log.String())

	// Restart: keys come from the KMS again.
	s = startServe(t, f, serveArgs...)
	if out, err := qio(s, "read -P 0x5c 0 64k"); err != nil || strings.Contains(out, "failed") {
		t.Fatalf("read after restart: %v %s", err, out)
	}
	// Rotate online to a new principal key.
	cli("key", "rotate-principal", "--volume", f.path, "--principal-key", "pg-next-"+wrap, "--create-principal-key", "--log-level", "debug")
	st := cli("status", "--volume", f.path, "--control-dir", ctl)
	if !strings.Contains(st, "pg-next-"+wrap) || !strings.Contains(st, "kms         ok") {
		t.Fatalf("status after rotation:\n%s", st)
	}
	// Revoke and destroy the old key: the volume no longer needs it.
	old, err := keys.OpenKMIP(ctx, k.settings("pg-main-"+wrap), false)
	if err != nil {
		t.Fatal(err)
	}
	oldID := old.Settings().KeyID
	if _, err := old.Client().Revoke(oldID).WithRevocationReasonCode(kmip.RevocationReasonCodeSuperseded).ExecContext(ctx); err != nil {
		t.Fatalf("revoke old key: %v", err)
	}
	if _, err := old.Client().Destroy(oldID).ExecContext(ctx); err != nil {
		t.Fatalf("destroy old key: %v", err)
	}
	old.Close()
	if err := s.stop(t); err != nil {
		t.Fatalf("serve stop: %v\n%s", err, s.log)
	}
	transcript.WriteString(s.log.String())
	s = startServe(t, f, serveArgs...)
	if out, err := qio(s, "read -P 0x5c 0 64k"); err != nil || strings.Contains(out, "failed") {
		t.Fatalf("read after the old key was destroyed: %v %s\n%s", err, out, s.log)
	}
	cli("key", "verify", "--volume", f.path)

	// Capture key material for the log scan before revoking.
	secrets := keyMaterial(t, k, f.path, "pg-next-"+wrap)

	// KMS unreachable while serving (dev server only): serve keeps going.
	if k.start != nil {
		k.stop()
		time.Sleep(800 * time.Millisecond)
		if out, err := qio(s, "read -P 0x5c 0 64k"); err != nil || strings.Contains(out, "failed") {
			t.Fatalf("read with the KMS down: %v %s", err, out)
		}
		st := cli("status", "--volume", f.path, "--control-dir", ctl)
		if !strings.Contains(st, "unreachable") {
			t.Fatalf("status does not show the unreachable KMS:\n%s", st)
		}
		k.start()
		time.Sleep(800 * time.Millisecond)
	}

	// Revoke the current key under a running serve: it must suspend.
	cur, err := keys.OpenKMIP(ctx, k.settings("pg-next-"+wrap), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cur.Client().Revoke(cur.Settings().KeyID).WithRevocationReasonCode(kmip.RevocationReasonCodeKeyCompromise).ExecContext(ctx); err != nil {
		t.Fatalf("revoke current key: %v", err)
	}
	cur.Close()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.log.String(), "suspending volume") {
		if time.Now().After(deadline) {
			t.Fatalf("serve did not suspend after the principal key was revoked:\n%s", s.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := qio(s, "read -P 0x5c 0 64k"); err == nil && !strings.Contains(out, "error") && !strings.Contains(out, "failed") {
		t.Fatalf("read succeeded on a suspended volume:\n%s", out)
	}
	st = cli("status", "--volume", f.path, "--control-dir", ctl)
	if !strings.Contains(st, "SUSPENDED") {
		t.Fatalf("status does not show the suspension:\n%s", st)
	}
	out, err := run(t, time.Minute, tdeshimBin, "key", "verify", "--volume", f.path)
	if err == nil || !strings.Contains(out, "not active") || !strings.Contains(out, "fix") {
		t.Fatalf("verify with a revoked key: %v\n%s", err, out)
	}
	transcript.WriteString(out)
	s.stop(t)
	transcript.WriteString(s.log.String())

	// No key byte in any log, error or status output.
	all := transcript.String()
	for name, b := range secrets {
		for _, enc := range []string{hex.EncodeToString(b), strings.ToUpper(hex.EncodeToString(b)), base64.StdEncoding.EncodeToString(b), string(b)} {
			if len(enc) >= 16 && strings.Contains(all, enc) {
				t.Fatalf("%s appears in logs/output", name)
			}
		}
		if strings.Contains(all, hex.EncodeToString(b[:8])) {
			t.Fatalf("a fragment of %s appears in logs/output", name)
		}
	}
}

// keyMaterial fetches the principal key (KMIP Get) and unwraps the
// volume's data key, to scan logs for them.
func keyMaterial(t *testing.T, k *kms, path, principal string) map[string][]byte {
	ctx := context.Background()
	s := k.settings(principal)
	s.Wrap = keys.WrapServer
	p, err := keys.OpenKMIP(ctx, s, false)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	out := map[string][]byte{}
	if resp, err := p.Client().Get(p.Settings().KeyID).ExecContext(ctx); err == nil {
		if sk, ok := resp.Object.(*kmip.SymmetricKey); ok {
			if b, err := sk.KeyMaterial(); err == nil {
				out["principal key"] = b
			}
		}
	}
	st, err := store.OpenFileNoLock(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	vs, err := volume.Inspect(st)
	if err != nil {
		t.Fatal(err)
	}
	sl := vs.Slots[vs.Header.VolumeKeySlot]
	dk, err := p.Unwrap(ctx, keys.Wrapped{Nonce: sl.Nonce, Ciphertext: sl.Ciphertext, Tag: sl.Tag}, layout.WrapAAD(vs.Header.UUID, vs.Header.VolumeKeySlot))
	if err != nil {
		t.Fatalf("unwrap volume key for the log scan: %v", err)
	}
	out["volume data key"] = append([]byte(nil), dk.Bytes()...)
	dk.Wipe()
	return out
}

func TestServeWaitsForAnUnreachableKMS(t *testing.T) {
	k := devKMS(t)
	dir := t.TempDir()
	f := &volumeFixture{dir: dir, path: filepath.Join(dir, "vol.img")}
	mustRun(t, time.Minute, tdeshimBin, append([]string{"init", "--volume", f.path, "--size", "16M", "--key-provider", "kmip", "--principal-key", "w", "--create-principal-key"}, k.flags()...)...)
	k.stop()
	sock := filepath.Join(dir, "s.sock")
	cmd := exec.Command(tdeshimBin, "serve", "--volume", f.path, "--listen", "unix:"+sock, "--control-dir", filepath.Join(dir, "ctl"))
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	time.Sleep(2500 * time.Millisecond)
	if _, err := os.Stat(sock); err == nil {
		t.Fatal("serve listens although it could not unwrap its keys")
	}
	k.start()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not come up after the KMS returned:\n%s", log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(log.String(), "KMS unreachable") {
		t.Fatalf("serve did not say it was waiting for the KMS:\n%s", log.String())
	}
}
