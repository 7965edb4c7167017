//go:build cgo

package crypto

/*
#cgo LDFLAGS: -lcrypto
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <openssl/evp.h>

// xts_blocks runs n data units of unit bytes through ctx, one IV (the LE block
// number) each. Reinitialising with a NULL key keeps the key schedule, so a
// call costs one IV setup per block, and one cgo crossing per request.
static int xts_blocks(EVP_CIPHER_CTX *ctx, unsigned char *dst, const unsigned char *src,
                      size_t n, size_t unit, uint64_t first, int enc) {
	unsigned char iv[16];
	int outl = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t t = first + i;
		memset(iv, 0, sizeof iv);
		for (int b = 0; b < 8; b++) iv[b] = (unsigned char)(t >> (8 * b));
		if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, enc) != 1) return 0;
		if (EVP_CipherUpdate(ctx, dst + i * unit, &outl, src + i * unit, (int)unit) != 1) return 0;
		if ((size_t)outl != unit) return 0;
	}
	return 1;
}

static EVP_CIPHER_CTX *xts_new(const unsigned char *key, int enc) {
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (ctx == NULL) return NULL;
	if (EVP_CipherInit_ex(ctx, EVP_aes_256_xts(), NULL, key, NULL, enc) != 1) {
		EVP_CIPHER_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}
*/
import "C"

import (
	"errors"
	"runtime"
	"sync"
	"unsafe"
)

// sslCipher is the OpenSSL engine. EVP contexts are not safe for concurrent
// use, so each direction keeps a small pool of contexts, all keyed once.
type sslCipher struct {
	key    []byte // copy for creating more contexts; wiped on Close
	mu     sync.Mutex
	enc    []*C.EVP_CIPHER_CTX
	dec    []*C.EVP_CIPHER_CTX
	closed bool
}

func newOpenSSL(key []byte) (Cipher, error) {
	s := &sslCipher{key: append(make([]byte, 0, KeySize), key...)}
	ctx, err := s.newCtx(1)
	if err != nil {
		return nil, err
	}
	s.enc = append(s.enc, ctx)
	return s, nil
}

func (s *sslCipher) newCtx(enc int) (*C.EVP_CIPHER_CTX, error) {
	k := C.CBytes(s.key)
	defer func() {
		C.memset(k, 0, C.size_t(len(s.key)))
		C.free(k)
	}()
	ctx := C.xts_new((*C.uchar)(k), C.int(enc))
	if ctx == nil {
		return nil, errors.New("crypto: OpenSSL refused AES-256-XTS key")
	}
	return ctx, nil
}

func (s *sslCipher) get(enc bool) *C.EVP_CIPHER_CTX {
	s.mu.Lock()
	pool := &s.dec
	flag := 0
	if enc {
		pool, flag = &s.enc, 1
	}
	if s.closed {
		s.mu.Unlock()
		panic("crypto: use of closed cipher")
	}
	if n := len(*pool); n > 0 {
		ctx := (*pool)[n-1]
		*pool = (*pool)[:n-1]
		s.mu.Unlock()
		return ctx
	}
	s.mu.Unlock()
	ctx, err := s.newCtx(flag)
	if err != nil {
		// The same key was accepted once; failing now means OpenSSL is out
		// of memory, which we cannot serve through.
		panic(err)
	}
	return ctx
}

func (s *sslCipher) put(ctx *C.EVP_CIPHER_CTX, enc bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		C.EVP_CIPHER_CTX_free(ctx)
		return
	}
	if enc {
		s.enc = append(s.enc, ctx)
	} else {
		s.dec = append(s.dec, ctx)
	}
}

func (s *sslCipher) run(dst, src []byte, first uint64, enc bool) {
	checkLen(dst, src)
	s.units(dst, src, BlockSize, first, enc)
}

// units processes len(src)/unit data units; tests use it with the 512-byte
// units of the IEEE 1619 vectors.
func (s *sslCipher) units(dst, src []byte, unit int, first uint64, enc bool) {
	if len(src) == 0 {
		return
	}
	ctx := s.get(enc)
	flag := C.int(0)
	if enc {
		flag = 1
	}
	ok := C.xts_blocks(ctx, (*C.uchar)(unsafe.Pointer(&dst[0])), (*C.uchar)(unsafe.Pointer(&src[0])),
		C.size_t(len(src)/unit), C.size_t(unit), C.uint64_t(first), flag)
	runtime.KeepAlive(dst)
	runtime.KeepAlive(src)
	s.put(ctx, enc)
	if ok != 1 {
		panic("crypto: OpenSSL AES-256-XTS failed on a keyed context")
	}
}

func (s *sslCipher) EncryptBlocks(dst, src []byte, first uint64) { s.run(dst, src, first, true) }
func (s *sslCipher) DecryptBlocks(dst, src []byte, first uint64) { s.run(dst, src, first, false) }
func (s *sslCipher) Engine() string                              { return "openssl" }

// Close frees every context; EVP_CIPHER_CTX_free cleanses the key schedule.
func (s *sslCipher) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	for _, c := range append(s.enc, s.dec...) {
		C.EVP_CIPHER_CTX_free(c)
	}
	s.enc, s.dec = nil, nil
	for i := range s.key {
		s.key[i] = 0
	}
}
