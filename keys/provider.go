package keys

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/tdeshim/tdeshim/layout"
)

// Wrapped is a data key sealed by a principal key: AES-256-GCM with a
// 12-byte nonce and 16-byte tag. Every provider produces this same blob.
type Wrapped struct {
	Nonce      [layout.NonceSize]byte
	Ciphertext [layout.WrappedKeySize]byte
	Tag        [layout.TagSize]byte
}

// Config is the non-secret provider setting recorded in the volume header,
// so serve can reopen a volume with no flags. It never holds key bytes.
type Config struct {
	Provider string `json:"provider"`
	// file provider
	KeyFile string `json:"key_file,omitempty"`
	// Principal names the principal key (a KMIP name, or "file").
	Principal string `json:"principal,omitempty"`
	// Extra carries provider-specific settings (KMIP endpoints, TLS file
	// paths, wrap mode).
	Extra map[string]string `json:"extra,omitempty"`
}

// Marshal encodes c for the header.
func (c Config) Marshal() ([]byte, error) { return json.Marshal(c) }

// ParseConfig decodes a header's provider settings.
func ParseConfig(b []byte) (Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("keys: provider settings in header: %w", err)
	}
	return c, nil
}

// Provider wraps and unwraps data keys with a principal key it holds or
// reaches. Providers are called at open, init and rotation only, never from
// the I/O path. aad binds each wrap to its volume and slot.
type Provider interface {
	// Config is what to record in the header to reopen this provider.
	Config() Config
	Wrap(ctx context.Context, key *Secret, aad []byte) (Wrapped, error)
	Unwrap(ctx context.Context, w Wrapped, aad []byte) (*Secret, error)
	// Check reports whether the principal key is reachable and usable.
	Check(ctx context.Context) error
	// Development is true for providers unfit for production.
	Development() bool
	Close() error
}

// ErrWrongKey means the principal key does not open this volume (wrong key
// file or KMS key, or a tampered wrapped key).
var ErrWrongKey = errors.New("key does not open this volume (wrong principal key, or the key table was altered)")

// Opener builds a provider from its recorded settings.
type Opener func(ctx context.Context, c Config) (Provider, error)

var (
	regMu   sync.Mutex
	openers = map[string]Opener{}
)

// Register makes a provider kind available to Open.
func Register(kind string, o Opener) {
	regMu.Lock()
	defer regMu.Unlock()
	openers[kind] = o
}

// Kinds lists registered provider kinds.
func Kinds() []string {
	regMu.Lock()
	defer regMu.Unlock()
	var ks []string
	for k := range openers {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Open returns the provider the settings name.
func Open(ctx context.Context, c Config) (Provider, error) {
	regMu.Lock()
	o, ok := openers[c.Provider]
	regMu.Unlock()
	if !ok {
		return nil, fmt.Errorf("keys: unknown key provider %q (known: %v)", c.Provider, Kinds())
	}
	return o(ctx, c)
}

// SealGCM wraps key under principal (32 bytes) with AES-256-GCM. Providers
// that hold the principal key locally share it.
func SealGCM(principal []byte, key *Secret, aad []byte) (Wrapped, error) {
	var w Wrapped
	if len(key.Bytes()) != layout.WrappedKeySize {
		return w, fmt.Errorf("keys: data key is %d bytes, want %d", len(key.Bytes()), layout.WrappedKeySize)
	}
	aead, err := newGCM(principal)
	if err != nil {
		return w, err
	}
	if _, err := rand.Read(w.Nonce[:]); err != nil {
		return w, err
	}
	out := aead.Seal(nil, w.Nonce[:], key.Bytes(), aad)
	copy(w.Ciphertext[:], out[:layout.WrappedKeySize])
	copy(w.Tag[:], out[layout.WrappedKeySize:])
	clear(out)
	return w, nil
}

// OpenGCM unwraps w; tampering or a wrong principal key gives ErrWrongKey.
func OpenGCM(principal []byte, w Wrapped, aad []byte) (*Secret, error) {
	aead, err := newGCM(principal)
	if err != nil {
		return nil, err
	}
	ct := make([]byte, 0, layout.WrappedKeySize+layout.TagSize)
	ct = append(append(ct, w.Ciphertext[:]...), w.Tag[:]...)
	pt, err := aead.Open(nil, w.Nonce[:], ct, aad)
	if err != nil {
		return nil, ErrWrongKey
	}
	return SecretFrom(pt)
}

func newGCM(principal []byte) (cipher.AEAD, error) {
	if len(principal) != 32 {
		return nil, fmt.Errorf("keys: principal key is %d bytes, want 32", len(principal))
	}
	block, err := aes.NewCipher(principal)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Principals is the table of principal keys recorded in the volume header.
// Every key slot names the entry whose key wraps it, so a rotation that
// stops half way leaves each slot openable by the old or the new key, and
// both are listed until it completes.
type Principals struct {
	Current uint16            `json:"current"`
	Keys    map[uint16]Config `json:"keys"`
	// Databases gives a database (by OID) its own principal key: the data
	// keys of its relations are wrapped by that entry instead of Current.
	Databases map[uint32]uint16 `json:"databases,omitempty"`
}

// ForDatabase is the entry that wraps new data keys of database db.
func (p Principals) ForDatabase(db uint32) uint16 {
	if n, ok := p.Databases[db]; ok {
		return n
	}
	return p.Current
}

// SinglePrincipal is the table of a new volume.
func SinglePrincipal(c Config) Principals {
	return Principals{Current: 0, Keys: map[uint16]Config{0: c}}
}

// Marshal encodes the table for the header.
func (p Principals) Marshal() ([]byte, error) { return json.Marshal(p) }

// ParsePrincipals decodes the header's table. A bare Config (the first
// releases' form) is read as a table with one entry, number 0.
func ParsePrincipals(b []byte) (Principals, error) {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(b, &probe); err != nil {
		return Principals{}, fmt.Errorf("keys: provider settings in header: %w", err)
	}
	if _, ok := probe["provider"]; ok {
		c, err := ParseConfig(b)
		return SinglePrincipal(c), err
	}
	var p Principals
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("keys: principal table in header: %w", err)
	}
	if _, ok := p.Keys[p.Current]; !ok {
		return p, fmt.Errorf("keys: principal table names current key %d but does not hold it", p.Current)
	}
	return p, nil
}

// CurrentConfig is the settings of the key that wraps new data keys.
func (p Principals) CurrentConfig() Config { return p.Keys[p.Current] }

// BatchUnwrapper is implemented by providers that unwrap many keys in few
// round trips (KMIP batch items).
type BatchUnwrapper interface {
	UnwrapBatch(ctx context.Context, ws []Wrapped, aads [][]byte) ([]*Secret, error)
}
