package keys

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

func TestFileProviderWrapRoundTripAndBinding(t *testing.T) {
	path := filepath.Join(t.TempDir(), "principal.key")
	if err := CreateKeyFile(path); err != nil {
		t.Fatal(err)
	}
	p, err := OpenFileProvider(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	dk, err := RandomSecret(64)
	if err != nil {
		t.Fatal(err)
	}
	defer dk.Wipe()
	ctx := context.Background()
	w, err := p.Wrap(ctx, dk, []byte("aad-1"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(w.Ciphertext[:], dk.Bytes()[:16]) {
		t.Fatal("wrapped key contains plaintext key bytes")
	}
	got, err := p.Unwrap(ctx, w, []byte("aad-1"))
	if err != nil || !bytes.Equal(got.Bytes(), dk.Bytes()) {
		t.Fatalf("unwrap: %v", err)
	}
	got.Wipe()
	if _, err := p.Unwrap(ctx, w, []byte("aad-2")); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("unwrap with other slot binding: %v, want ErrWrongKey", err)
	}
	w.Ciphertext[3] ^= 1
	if _, err := p.Unwrap(ctx, w, []byte("aad-1")); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("tampered wrapped key: %v, want ErrWrongKey", err)
	}
}

func TestFileProviderRefusesLooseModeAndGarbage(t *testing.T) {
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose.key")
	os.WriteFile(loose, bytes.Repeat([]byte("a"), 64), 0o644)
	if _, err := OpenFileProvider(loose); err == nil {
		t.Fatal("world-readable key file accepted")
	}
	bad := filepath.Join(dir, "bad.key")
	os.WriteFile(bad, []byte("short"), 0o600)
	if _, err := OpenFileProvider(bad); err == nil {
		t.Fatal("5-byte key file accepted")
	}
	if _, err := OpenFileProvider(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing key file accepted")
	}
}

func TestSecretNeverFormatsItsBytes(t *testing.T) {
	s, err := SecretFrom([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	out := fmt.Sprintf("%v %s %+v %#v", s, s, s, s)
	if bytes.Contains([]byte(out), []byte("0123456789")) {
		t.Fatalf("secret leaked into formatting: %q", out)
	}
	b := s.Bytes()
	s.Wipe()
	if s.Bytes() != nil {
		t.Fatal("Bytes after Wipe")
	}
	_ = b // the mapping is gone; touching b would fault, which is the point
}
