package crypto

import (
	"crypto/aes"

	"golang.org/x/crypto/xts"
)

// goCipher is the pure-Go engine. It is slow (x/crypto/xts calls AES once
// per 16 bytes) but has no dependency beyond the Go toolchain.
type goCipher struct {
	c *xts.Cipher
}

// NewGo returns the pure-Go engine regardless of what else is built in.
func NewGo(key []byte) (Cipher, error) {
	if err := checkKey(key); err != nil {
		return nil, err
	}
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, err
	}
	return &goCipher{c: c}, nil
}

func (g *goCipher) EncryptBlocks(dst, src []byte, first uint64) {
	checkLen(dst, src)
	for i := 0; i < len(src); i += BlockSize {
		g.c.Encrypt(dst[i:i+BlockSize], src[i:i+BlockSize], first+uint64(i/BlockSize))
	}
}

func (g *goCipher) DecryptBlocks(dst, src []byte, first uint64) {
	checkLen(dst, src)
	for i := 0; i < len(src); i += BlockSize {
		g.c.Decrypt(dst[i:i+BlockSize], src[i:i+BlockSize], first+uint64(i/BlockSize))
	}
}

func (g *goCipher) Engine() string { return "go" }

// Close drops the key schedule. x/crypto/xts keeps it in unexported AES
// state we cannot wipe; the process is non-dumpable and the raw key lives in
// locked memory owned by the keys package.
func (g *goCipher) Close() { g.c = nil }
