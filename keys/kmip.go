package keys

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipclient"
	"github.com/ovh/kmip-go/payloads"

	"github.com/tdeshim/tdeshim/layout"
)

// KMIP wrap modes.
const (
	// WrapServer: the principal key never leaves the KMS; data keys are
	// wrapped by KMIP Encrypt/Decrypt with AES-GCM.
	WrapServer = "server"
	// WrapLocal: KMIP Get of the principal key, then the same AES-GCM wrap
	// here, for servers without Encrypt/Decrypt.
	WrapLocal = "local"
)

// Errors a KMIP provider reports, each with what to do.
var (
	ErrKMSUnreachable     = errors.New("KMIP server unreachable")
	ErrPrincipalNotFound  = errors.New("no principal key with that name in the KMS")
	ErrPrincipalInactive  = errors.New("principal key is not active in the KMS")
	ErrKMIPVersion        = errors.New("KMIP server protocol is older than 1.4")
	ErrTLSServer          = errors.New("KMIP server certificate not trusted")
	ErrTLSClient          = errors.New("KMIP server rejected the client certificate")
	ErrClientCertExpired  = errors.New("client certificate expired")
	ErrServerEncryptUnsup = errors.New("KMIP server does not offer AES-GCM Encrypt/Decrypt")
)

// KMIPSettings is everything needed to reach a principal key. All of it is
// non-secret (file paths, names); it is recorded in the volume header.
type KMIPSettings struct {
	Endpoints []string      // host:port, tried in order (failover)
	CA        string        // PEM file: CA(s) that sign the KMS certificate
	Cert, Key string        // PEM files: client certificate and key (mutual TLS)
	Principal string        // key name in the KMS
	KeyID     string        // its unique identifier, resolved at init
	Wrap      string        // WrapServer or WrapLocal
	Timeout   time.Duration // per request; default 10 s
}

// Config renders the settings for the header.
func (s KMIPSettings) Config() Config {
	return Config{Provider: "kmip", Principal: s.Principal, Extra: map[string]string{
		"endpoints": strings.Join(s.Endpoints, ","), "ca": s.CA, "cert": s.Cert, "key": s.Key,
		"key_id": s.KeyID, "wrap": s.Wrap,
	}}
}

// KMIPSettingsFrom reads settings recorded by Config.
func KMIPSettingsFrom(c Config) KMIPSettings {
	e := c.Extra
	s := KMIPSettings{Principal: c.Principal, CA: e["ca"], Cert: e["cert"], Key: e["key"], KeyID: e["key_id"], Wrap: e["wrap"]}
	for _, ep := range strings.Split(e["endpoints"], ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			s.Endpoints = append(s.Endpoints, ep)
		}
	}
	return s
}

func init() {
	Register("kmip", func(ctx context.Context, c Config) (Provider, error) {
		return OpenKMIP(ctx, KMIPSettingsFrom(c), false)
	})
}

// KMIPProvider wraps data keys with a principal key held in a KMIP server.
type KMIPProvider struct {
	s      KMIPSettings
	mu     sync.Mutex
	client *kmipclient.Client
	local  *Secret // WrapLocal: the principal key, fetched once
}

// OpenKMIP connects (mutual TLS, KMIP ≥ 1.4) and resolves the principal
// key: by id if known, else by name, creating and activating it when
// create is set.
func OpenKMIP(ctx context.Context, s KMIPSettings, create bool) (*KMIPProvider, error) {
	if len(s.Endpoints) == 0 {
		return nil, errors.New("kmip: no endpoint given (--kmip-endpoint host:5696)")
	}
	if s.Wrap == "" {
		s.Wrap = WrapServer
	}
	if s.Wrap != WrapServer && s.Wrap != WrapLocal {
		return nil, fmt.Errorf("kmip: wrap mode %q: want server or local", s.Wrap)
	}
	if s.Timeout == 0 {
		s.Timeout = 10 * time.Second
	}
	p := &KMIPProvider{s: s}
	if err := p.connect(ctx); err != nil {
		return nil, err
	}
	if p.s.KeyID == "" {
		if err := p.resolve(ctx, create); err != nil {
			p.Close()
			return nil, err
		}
	}
	if err := p.Check(ctx); err != nil {
		p.Close()
		return nil, err
	}
	if p.s.Wrap == WrapLocal {
		if err := p.fetchLocal(ctx); err != nil {
			p.Close()
			return nil, err
		}
	}
	return p, nil
}

func (p *KMIPProvider) connect(ctx context.Context) error {
	if err := checkClientCert(p.s.Cert); err != nil {
		return err
	}
	opts := []kmipclient.Option{
		kmipclient.WithRootCAFile(p.s.CA),
		kmipclient.WithClientCertFiles(p.s.Cert, p.s.Key),
		// 1.4 only: kmip-go v0.8.1 encodes 1.x payloads (a 2.0 Create lacks
		// the Attributes structure), and below 1.4 it drops AAD and tags.
		kmipclient.WithKmipVersions(kmip.V1_4),
		kmipclient.WithMiddlewares(kmipclient.TimeoutMiddleware(p.s.Timeout)),
	}
	var last error
	// Each endpoint in turn, a few rounds with backoff: failover first,
	// patience second.
	for round := 0; round < 3; round++ {
		for _, ep := range p.s.Endpoints {
			dctx, cancel := context.WithTimeout(ctx, p.s.Timeout)
			c, err := kmipclient.DialContext(dctx, ep, opts...)
			cancel()
			if err == nil {
				if v := c.Version(); v.ProtocolVersionMajor < 1 || (v.ProtocolVersionMajor == 1 && v.ProtocolVersionMinor < 4) {
					c.Close()
					return fmt.Errorf("%w: %s speaks %d.%d; tdeshim needs 1.4 or later, where AES-GCM additional data and tags exist",
						ErrKMIPVersion, ep, v.ProtocolVersionMajor, v.ProtocolVersionMinor)
				}
				p.client = c
				return nil
			}
			last = classifyDialErr(ep, p.s, err)
			if errors.Is(last, ErrTLSServer) || errors.Is(last, ErrTLSClient) || errors.Is(last, ErrKMIPVersion) {
				return last // configuration errors: retrying will not help
			}
		}
		if ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(200<<round) * time.Millisecond):
		}
	}
	return last
}

func classifyDialErr(ep string, s KMIPSettings, err error) error {
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	var hn x509.HostnameError
	var ne net.Error
	msg := err.Error()
	switch {
	case errors.As(err, &ua), errors.As(err, &hn):
		return fmt.Errorf("%w: %s presented a certificate not signed by %s or not for that name (%v); check --kmip-ca and the endpoint name", ErrTLSServer, ep, s.CA, err)
	case errors.As(err, &ci):
		return fmt.Errorf("%w: %s: %v", ErrTLSServer, ep, err)
	case strings.Contains(msg, "bad certificate"), strings.Contains(msg, "unknown certificate"),
		strings.Contains(msg, "certificate required"), strings.Contains(msg, "unknown ca"), strings.Contains(msg, "expired certificate"):
		return fmt.Errorf("%w: %s refused %s (%v); check --kmip-cert/--kmip-key and that the KMS trusts its issuer", ErrTLSClient, ep, s.Cert, err)
	case strings.Contains(msg, "protocol version"), strings.Contains(msg, "not supported"):
		return fmt.Errorf("%w: %s: %v", ErrKMIPVersion, ep, err)
	case errors.As(err, &ne), strings.Contains(msg, "connection refused"), strings.Contains(msg, "EOF"):
		return fmt.Errorf("%w: %s: %v; check the endpoint and that the KMS is running", ErrKMSUnreachable, ep, err)
	}
	return fmt.Errorf("%w: %s: %v", ErrKMSUnreachable, ep, err)
}

// checkClientCert refuses an expired or not-yet-valid client certificate
// before the TLS handshake turns it into an opaque alert.
func checkClientCert(path string) error {
	if path == "" {
		return errors.New("kmip: no client certificate (--kmip-cert, --kmip-key): KMIP needs mutual TLS")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("kmip: client certificate: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return fmt.Errorf("kmip: %s holds no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return fmt.Errorf("kmip: %s: %w", path, err)
	}
	if now := time.Now(); now.After(c.NotAfter) || now.Before(c.NotBefore) {
		return fmt.Errorf("%w: %s is valid %s to %s; issue a new one", ErrClientCertExpired, path,
			c.NotBefore.Format(time.RFC3339), c.NotAfter.Format(time.RFC3339))
	}
	return nil
}

func (p *KMIPProvider) resolve(ctx context.Context, create bool) error {
	if p.s.Principal == "" {
		return errors.New("kmip: no principal key name (--principal-key NAME)")
	}
	resp, err := p.client.Locate().WithName(p.s.Principal).ExecContext(ctx)
	if err != nil {
		return fmt.Errorf("kmip: locate %q: %w", p.s.Principal, err)
	}
	switch n := len(resp.UniqueIdentifier); {
	case n == 1:
		p.s.KeyID = resp.UniqueIdentifier[0]
		return nil
	case n > 1:
		return fmt.Errorf("kmip: %d keys are named %q; name one uniquely", n, p.s.Principal)
	case !create:
		return fmt.Errorf("%w: %q; create it in the KMS or pass --create-principal-key", ErrPrincipalNotFound, p.s.Principal)
	}
	usage := kmip.CryptographicUsageEncrypt | kmip.CryptographicUsageDecrypt
	cr, err := p.client.Create().AES(256, usage).WithName(p.s.Principal).ExecContext(ctx)
	if err != nil {
		return fmt.Errorf("kmip: create principal key %q: %w", p.s.Principal, err)
	}
	if _, err := p.client.Activate(cr.UniqueIdentifier).ExecContext(ctx); err != nil {
		return fmt.Errorf("kmip: activate principal key %q: %w", p.s.Principal, err)
	}
	p.s.KeyID = cr.UniqueIdentifier
	return nil
}

func (p *KMIPProvider) fetchLocal(ctx context.Context) error {
	resp, err := p.client.Get(p.s.KeyID).ExecContext(ctx)
	if err != nil {
		return fmt.Errorf("kmip: get principal key %q (wrap=local needs an exportable key): %w", p.s.Principal, err)
	}
	sk, ok := resp.Object.(*kmip.SymmetricKey)
	if !ok {
		return fmt.Errorf("kmip: principal key %q is a %T, not a symmetric key", p.s.Principal, resp.Object)
	}
	b, err := sk.KeyMaterial()
	if err != nil || len(b) != 32 {
		return fmt.Errorf("kmip: principal key %q is not a 256-bit AES key", p.s.Principal)
	}
	p.local, err = SecretFrom(b)
	return err
}

// Settings returns the resolved settings (with the key id).
func (p *KMIPProvider) Settings() KMIPSettings { return p.s }

func (p *KMIPProvider) Config() Config { return p.s.Config() }

func (p *KMIPProvider) Development() bool { return false }

func gcmParams() kmip.CryptographicParameters {
	return kmip.CryptographicParameters{
		CryptographicAlgorithm: kmip.CryptographicAlgorithmAES,
		BlockCipherMode:        kmip.BlockCipherModeGCM,
		TagLength:              layout.TagSize,
		IVLength:               layout.NonceSize,
	}
}

func (p *KMIPProvider) Wrap(ctx context.Context, key *Secret, aad []byte) (Wrapped, error) {
	if p.s.Wrap == WrapLocal {
		return SealGCM(p.local.Bytes(), key, aad)
	}
	var w Wrapped
	if _, err := rand.Read(w.Nonce[:]); err != nil {
		return w, err
	}
	resp, err := p.client.Encrypt(p.s.KeyID).WithCryptographicParameters(gcmParams()).
		WithIvCounterNonce(w.Nonce[:]).WithAAD(aad).Data(key.Bytes()).ExecContext(ctx)
	if err != nil {
		return w, fmt.Errorf("kmip: wrap with %q: %w", p.s.Principal, p.kmsErr(err))
	}
	if len(resp.Data) != layout.WrappedKeySize || len(resp.AuthenticatedEncryptionTag) != layout.TagSize {
		return w, fmt.Errorf("%w (got %d bytes and a %d-byte tag); use --wrap local", ErrServerEncryptUnsup, len(resp.Data), len(resp.AuthenticatedEncryptionTag))
	}
	if len(resp.IVCounterNonce) == layout.NonceSize {
		copy(w.Nonce[:], resp.IVCounterNonce)
	}
	copy(w.Ciphertext[:], resp.Data)
	copy(w.Tag[:], resp.AuthenticatedEncryptionTag)
	return w, nil
}

func (p *KMIPProvider) Unwrap(ctx context.Context, w Wrapped, aad []byte) (*Secret, error) {
	if p.s.Wrap == WrapLocal {
		return OpenGCM(p.local.Bytes(), w, aad)
	}
	resp, err := p.client.Request(ctx, p.decryptPayload(w, aad))
	if err != nil {
		return nil, p.unwrapErr(err)
	}
	return p.unwrapResult(resp)
}

func (p *KMIPProvider) decryptPayload(w Wrapped, aad []byte) *payloads.DecryptRequestPayload {
	params := gcmParams()
	return &payloads.DecryptRequestPayload{
		UniqueIdentifier: p.s.KeyID, CryptographicParameters: &params,
		Data: append([]byte(nil), w.Ciphertext[:]...), IVCounterNonce: append([]byte(nil), w.Nonce[:]...),
		AuthenticatedEncryptionAdditionalData: aad, AuthenticatedEncryptionTag: append([]byte(nil), w.Tag[:]...),
	}
}

func (p *KMIPProvider) unwrapResult(pl kmip.OperationPayload) (*Secret, error) {
	resp, ok := pl.(*payloads.DecryptResponsePayload)
	if !ok || len(resp.Data) != layout.WrappedKeySize {
		return nil, ErrWrongKey
	}
	return SecretFrom(resp.Data)
}

func (p *KMIPProvider) unwrapErr(err error) error {
	if e := p.kmsErr(err); e != err {
		return e
	}
	// The KMS answered but would not decrypt: tag mismatch (tampering, or
	// another key).
	if strings.Contains(strings.ToLower(err.Error()), "crypto") || strings.Contains(err.Error(), "Invalid") ||
		strings.Contains(err.Error(), "Operation Failed") || strings.Contains(err.Error(), "tag") {
		return fmt.Errorf("%w: %v", ErrWrongKey, err)
	}
	return fmt.Errorf("kmip: unwrap with %q: %w", p.s.Principal, err)
}

// UnwrapBatch unwraps many keys in few round trips (KMIP batch items), so
// opening a volume with thousands of relation keys stays fast.
func (p *KMIPProvider) UnwrapBatch(ctx context.Context, ws []Wrapped, aads [][]byte) ([]*Secret, error) {
	out := make([]*Secret, len(ws))
	if p.s.Wrap == WrapLocal {
		for i := range ws {
			s, err := OpenGCM(p.local.Bytes(), ws[i], aads[i])
			if err != nil {
				wipeAll(out)
				return nil, err
			}
			out[i] = s
		}
		return out, nil
	}
	const batch = 100
	for lo := 0; lo < len(ws); lo += batch {
		hi := min(lo+batch, len(ws))
		pls := make([]kmip.OperationPayload, 0, hi-lo)
		for i := lo; i < hi; i++ {
			pls = append(pls, p.decryptPayload(ws[i], aads[i]))
		}
		res, err := p.client.Batch(ctx, pls...)
		if err != nil {
			wipeAll(out)
			return nil, p.unwrapErr(err)
		}
		for j, item := range res {
			if err := item.Err(); err != nil {
				wipeAll(out)
				return nil, p.unwrapErr(err)
			}
			s, err := p.unwrapResult(item.ResponsePayload)
			if err != nil {
				wipeAll(out)
				return nil, err
			}
			out[lo+j] = s
		}
	}
	return out, nil
}

func wipeAll(ss []*Secret) {
	for _, s := range ss {
		s.Wipe()
	}
}

// State returns the principal key's KMIP state.
func (p *KMIPProvider) State(ctx context.Context) (kmip.State, error) {
	resp, err := p.client.GetAttributes(p.s.KeyID, kmip.AttributeNameState).ExecContext(ctx)
	if err != nil {
		return 0, p.kmsErr(err)
	}
	for _, a := range resp.Attribute {
		if a.AttributeName == kmip.AttributeNameState {
			if st, ok := a.AttributeValue.(kmip.State); ok {
				return st, nil
			}
		}
	}
	return 0, fmt.Errorf("kmip: the KMS returned no State for key %q", p.s.Principal)
}

// Check: reachable, and the principal key is Active.
func (p *KMIPProvider) Check(ctx context.Context) error {
	st, err := p.State(ctx)
	if err != nil {
		return err
	}
	if st != kmip.StateActive {
		return fmt.Errorf("%w: %q (id %s) is %v; activate it, or rotate to an active key", ErrPrincipalInactive, p.s.Principal, p.s.KeyID, st)
	}
	return nil
}

// kmsErr turns transport failures into ErrKMSUnreachable, and a missing
// object into ErrPrincipalNotFound.
func (p *KMIPProvider) kmsErr(err error) error {
	msg := err.Error()
	var ne net.Error
	switch {
	case errors.As(err, &ne), errors.Is(err, context.DeadlineExceeded), strings.Contains(msg, "connection"), strings.Contains(msg, "EOF"), strings.Contains(msg, "broken pipe"):
		return fmt.Errorf("%w: %v", ErrKMSUnreachable, err)
	case strings.Contains(msg, "Item Not Found"), strings.Contains(msg, "ItemNotFound"):
		return fmt.Errorf("%w: %q (id %s): %v", ErrPrincipalNotFound, p.s.Principal, p.s.KeyID, err)
	case strings.Contains(msg, "Wrong Key Lifecycle State"), strings.Contains(msg, "WrongKeyLifecycleState"), strings.Contains(msg, "Permission Denied"):
		return fmt.Errorf("%w: %q: %v", ErrPrincipalInactive, p.s.Principal, err)
	}
	return err
}

// Client exposes the KMIP client for administration (revoke, destroy) in
// tools and tests.
func (p *KMIPProvider) Client() *kmipclient.Client { return p.client }

func (p *KMIPProvider) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.local.Wipe()
	if p.client != nil {
		err := p.client.Close()
		p.client = nil
		return err
	}
	return nil
}
