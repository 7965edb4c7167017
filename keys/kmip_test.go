package keys_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipserver"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/kmipdev"
)

func init() { slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil))) }

func devServer(t *testing.T) *kmipdev.Server {
	t.Helper()
	s, err := kmipdev.Start(t.TempDir(), "127.0.0.1:0", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func settings(s *kmipdev.Server, name, wrap string) keys.KMIPSettings {
	return keys.KMIPSettings{Endpoints: []string{s.Addr}, CA: s.Certs.CA, Cert: s.Certs.ClientCert, Key: s.Certs.ClientKey,
		Principal: name, Wrap: wrap, Timeout: 3 * time.Second}
}

func TestKMIPWrapUnwrapBothModes(t *testing.T) {
	s := devServer(t)
	ctx := context.Background()
	for _, mode := range []string{keys.WrapServer, keys.WrapLocal} {
		t.Run(mode, func(t *testing.T) {
			p, err := keys.OpenKMIP(ctx, settings(s, "pk-"+mode, mode), true)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			dk, _ := keys.RandomSecret(64)
			defer dk.Wipe()
			w, err := p.Wrap(ctx, dk, []byte("aad"))
			if err != nil {
				t.Fatal(err)
			}
			got, err := p.Unwrap(ctx, w, []byte("aad"))
			if err != nil || !bytes.Equal(got.Bytes(), dk.Bytes()) {
				t.Fatalf("unwrap: %v", err)
			}
			if _, err := p.Unwrap(ctx, w, []byte("other slot")); !errors.Is(err, keys.ErrWrongKey) {
				t.Fatalf("unwrap with other AAD: %v, want ErrWrongKey", err)
			}
			// The same blob format in both modes: a blob wrapped remotely
			// opens locally with the exported key and vice versa.
			other := keys.WrapLocal
			if mode == keys.WrapLocal {
				other = keys.WrapServer
			}
			st := p.Settings()
			st.Wrap = other
			q, err := keys.OpenKMIP(ctx, st, false)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			if got, err := q.Unwrap(ctx, w, []byte("aad")); err != nil || !bytes.Equal(got.Bytes(), dk.Bytes()) {
				t.Fatalf("%s blob does not open in %s mode: %v", mode, other, err)
			}
			// Batches.
			var ws []keys.Wrapped
			var aads [][]byte
			for i := 0; i < 250; i++ {
				w, _ := p.Wrap(ctx, dk, []byte{byte(i)})
				ws, aads = append(ws, w), append(aads, []byte{byte(i)})
			}
			out, err := p.UnwrapBatch(ctx, ws, aads)
			if err != nil || len(out) != 250 || !bytes.Equal(out[249].Bytes(), dk.Bytes()) {
				t.Fatalf("batch unwrap: %v", err)
			}
		})
	}
}

func TestKMIPErrorsAreDistinct(t *testing.T) {
	s := devServer(t)
	ctx := context.Background()
	good := settings(s, "pk", keys.WrapServer)
	p, err := keys.OpenKMIP(ctx, good, true)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()

	// Wrong key name.
	bad := good
	bad.Principal = "nope"
	if _, err := keys.OpenKMIP(ctx, bad, false); !errors.Is(err, keys.ErrPrincipalNotFound) {
		t.Errorf("wrong name: %v", err)
	}
	// Wrong CA: another development PKI.
	other, _ := kmipdev.EnsureCerts(t.TempDir())
	bad = good
	bad.CA = other.CA
	if _, err := keys.OpenKMIP(ctx, bad, false); !errors.Is(err, keys.ErrTLSServer) {
		t.Errorf("wrong CA: %v", err)
	}
	// Client certificate from a CA the server does not trust.
	bad = good
	bad.Cert, bad.Key = other.ClientCert, other.ClientKey
	if _, err := keys.OpenKMIP(ctx, bad, false); !errors.Is(err, keys.ErrTLSClient) {
		t.Errorf("untrusted client cert: %v", err)
	}
	// Expired client certificate.
	ca, caKey, err := s.Certs.LoadCA()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	exp, expKey := filepath.Join(dir, "c.pem"), filepath.Join(dir, "c.key")
	kmipdev.IssueCert(ca, caKey, "old", x509.ExtKeyUsageClientAuth, time.Now().Add(-time.Hour), exp, expKey)
	bad = good
	bad.Cert, bad.Key = exp, expKey
	if _, err := keys.OpenKMIP(ctx, bad, false); !errors.Is(err, keys.ErrClientCertExpired) {
		t.Errorf("expired client cert: %v", err)
	}
	// Unreachable.
	bad = good
	bad.Endpoints = []string{"127.0.0.1:1"}
	bad.Timeout = 300 * time.Millisecond
	if _, err := keys.OpenKMIP(ctx, bad, false); !errors.Is(err, keys.ErrKMSUnreachable) {
		t.Errorf("unreachable: %v", err)
	}
	// Failover: a dead endpoint first, the live one second.
	fo := good
	fo.Endpoints = []string{"127.0.0.1:1", s.Addr}
	if p, err := keys.OpenKMIP(ctx, fo, false); err != nil {
		t.Errorf("failover to the second endpoint: %v", err)
	} else {
		p.Close()
	}
	// Revoked key: not active.
	p, _ = keys.OpenKMIP(ctx, good, false)
	if _, err := p.Client().Revoke(p.Settings().KeyID).WithRevocationReasonCode(kmip.RevocationReasonCodeCessationOfOperation).ExecContext(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(ctx); !errors.Is(err, keys.ErrPrincipalInactive) {
		t.Errorf("revoked key check: %v", err)
	}
	p.Close()
	if _, err := keys.OpenKMIP(ctx, good, false); !errors.Is(err, keys.ErrPrincipalInactive) {
		t.Errorf("open with a revoked key: %v", err)
	}
}

func TestKMIPInjectedFaults(t *testing.T) {
	s := devServer(t)
	ctx := context.Background()
	p, err := keys.OpenKMIP(ctx, settings(s, "pk", keys.WrapServer), true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	dk, _ := keys.RandomSecret(64)
	defer dk.Wipe()
	s.InjectFault(func(op kmip.Operation) error {
		if op == kmip.OperationEncrypt {
			return kmipserver.Errorf(kmip.ResultReasonOperationNotSupported, "injected")
		}
		return nil
	})
	if _, err := p.Wrap(ctx, dk, nil); err == nil {
		t.Fatal("wrap succeeded through an injected error reply")
	}
	// Slow server: the request times out instead of hanging.
	s.InjectFault(func(op kmip.Operation) error {
		if op == kmip.OperationGetAttributes {
			time.Sleep(5 * time.Second)
		}
		return nil
	})
	start := time.Now()
	if err := p.Check(ctx); err == nil || time.Since(start) > 4500*time.Millisecond {
		t.Fatalf("slow KMS: err=%v after %v, want a timeout within ~3s", err, time.Since(start))
	}
	s.InjectFault(nil)
}
