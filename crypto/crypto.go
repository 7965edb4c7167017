// Package crypto is tdeshim's block cipher: AES-256-XTS over 4 KiB data
// units, with the logical block number as the tweak (IEEE 1619 data unit
// sequence number, little-endian). Nothing else lives here, so the whole
// cipher core can be reviewed in one sitting.
//
// Two engines implement the same Cipher interface and pass the same
// vectors: OpenSSL's EVP AES-256-XTS through cgo (AES-NI, ~6 GB/s per core
// here) and a pure-Go fallback built on golang.org/x/crypto/xts (~0.4 GB/s),
// used when the binary is built with CGO_ENABLED=0.
package crypto

import (
	"errors"
	"fmt"
)

// BlockSize is the XTS data unit: one volume block.
const BlockSize = 4096

// KeySize is the length of an AES-256-XTS key: two independent AES-256 keys.
const KeySize = 64

// Cipher encrypts whole 4 KiB blocks. The block number is the tweak, so a
// block keeps decrypting after the backing image is copied or moved.
// Implementations are safe for concurrent use.
type Cipher interface {
	// EncryptBlocks encrypts len(src)/BlockSize consecutive blocks, the first
	// being block number first. len(src) must be a multiple of BlockSize and
	// len(dst) >= len(src); dst and src may be the same slice.
	EncryptBlocks(dst, src []byte, first uint64)
	// DecryptBlocks is the inverse of EncryptBlocks.
	DecryptBlocks(dst, src []byte, first uint64)
	// Engine names the implementation ("openssl" or "go").
	Engine() string
	// Close wipes the key schedule.
	Close()
}

// ErrKey reports a key that AES-256-XTS must not use.
var ErrKey = errors.New("crypto: invalid AES-256-XTS key")

// checkKey enforces the IEEE 1619 requirement that the two halves differ
// (OpenSSL 3 refuses equal halves too, and a random key never has them).
func checkKey(key []byte) error {
	if len(key) != KeySize {
		return fmt.Errorf("%w: %d bytes, want %d", ErrKey, len(key), KeySize)
	}
	same := byte(0)
	for i := 0; i < KeySize/2; i++ {
		same |= key[i] ^ key[i+KeySize/2]
	}
	if same == 0 {
		return fmt.Errorf("%w: both halves are equal", ErrKey)
	}
	return nil
}

// New returns the fastest engine built into this binary.
func New(key []byte) (Cipher, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	if c, err := newOpenSSL(key); err == nil {
		return c, nil
	}
	return NewGo(key)
}

// checkLen panics on a length that is not whole blocks: callers own the
// block arithmetic, so this is a programming error, never input.
func checkLen(dst, src []byte) {
	if len(src)%BlockSize != 0 || len(dst) < len(src) {
		panic(fmt.Sprintf("crypto: bad lengths dst=%d src=%d", len(dst), len(src)))
	}
}
