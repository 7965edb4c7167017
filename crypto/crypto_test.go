package crypto

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"testing"
)

// IEEE P1619/D16 Annex B, vector 10: XTS-AES-256, data unit 0xff, 512 bytes.
const (
	ieeeKey10 = "2718281828459045235360287471352662497757247093699959574966967627" +
		"3141592653589793238462643383279502884197169399375105820974944592"
	ieeeCtx10Prefix = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
)

func mustHex(t testing.TB, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func engines(t *testing.T, key []byte) []Cipher {
	t.Helper()
	g, err := NewGo(key)
	if err != nil {
		t.Fatal(err)
	}
	out := []Cipher{g}
	if s, err := newOpenSSL(key); err == nil {
		out = append(out, s)
	} else if os.Getenv("TDESHIM_REQUIRE_OPENSSL") != "" {
		t.Fatalf("OpenSSL engine required but unavailable: %v", err)
	}
	t.Cleanup(func() {
		for _, c := range out {
			c.Close()
		}
	})
	return out
}

func TestIEEE1619Vector10(t *testing.T) {
	key := mustHex(t, ieeeKey10)
	pt := make([]byte, 512)
	for i := range pt {
		pt[i] = byte(i)
	}
	for _, c := range engines(t, key) {
		ct := make([]byte, 512)
		switch e := c.(type) {
		case *goCipher:
			e.c.Encrypt(ct, pt, 0xff)
		default:
			unitEncrypt(t, e, ct, pt, 512, 0xff)
		}
		if got := hex.EncodeToString(ct[:32]); got != ieeeCtx10Prefix {
			t.Fatalf("%s: ciphertext %s, want %s", c.Engine(), got, ieeeCtx10Prefix)
		}
	}
}

// TestGoldenBlocks pins our own 4 KiB vectors: any change in tweak encoding
// or key order changes these hashes and breaks every existing volume.
func TestGoldenBlocks(t *testing.T) {
	key := make([]byte, KeySize)
	for i := range key {
		key[i] = byte(i)
	}
	pt := make([]byte, 3*BlockSize)
	for i := range pt {
		pt[i] = byte(i * 7)
	}
	golden := goldenHashes()
	for _, c := range engines(t, key) {
		for first := range golden {
			ct := make([]byte, len(pt))
			c.EncryptBlocks(ct, pt, first)
			sum := sha256.Sum256(ct)
			if got := hex.EncodeToString(sum[:]); got != golden[first] {
				t.Errorf("%s first=%d: sha256 %s, want %s", c.Engine(), first, got, golden[first])
			}
			back := make([]byte, len(ct))
			c.DecryptBlocks(back, ct, first)
			if !bytes.Equal(back, pt) {
				t.Errorf("%s first=%d: round trip differs", c.Engine(), first)
			}
		}
	}
}

func TestEnginesAgreeOnRandomData(t *testing.T) {
	key := make([]byte, KeySize)
	rand.Read(key)
	pt := make([]byte, 16*BlockSize)
	rand.Read(pt)
	es := engines(t, key)
	ref := make([]byte, len(pt))
	es[0].EncryptBlocks(ref, pt, 12345)
	for _, c := range es[1:] {
		ct := make([]byte, len(pt))
		c.EncryptBlocks(ct, pt, 12345)
		if !bytes.Equal(ct, ref) {
			t.Fatalf("%s disagrees with %s", c.Engine(), es[0].Engine())
		}
		// Block i encrypted alone must equal block i of the batch: the
		// tweak is the block number, not a position in the request.
		one := make([]byte, BlockSize)
		c.EncryptBlocks(one, pt[5*BlockSize:6*BlockSize], 12345+5)
		if !bytes.Equal(one, ref[5*BlockSize:6*BlockSize]) {
			t.Fatalf("%s: batch and single-block tweaks differ", c.Engine())
		}
		// In place.
		buf := append([]byte(nil), ref...)
		c.DecryptBlocks(buf, buf, 12345)
		if !bytes.Equal(buf, pt) {
			t.Fatalf("%s: in-place decrypt differs", c.Engine())
		}
	}
}

func TestRejectsBadKeys(t *testing.T) {
	if _, err := New(make([]byte, 32)); err == nil {
		t.Fatal("32-byte key accepted")
	}
	same := bytes.Repeat([]byte{7}, KeySize)
	if _, err := New(same); err == nil {
		t.Fatal("key with equal halves accepted")
	}
}

func BenchmarkEncrypt4K(b *testing.B) { benchEngine(b, true) }
func BenchmarkDecrypt4K(b *testing.B) { benchEngine(b, false) }

func benchEngine(b *testing.B, enc bool) {
	key := make([]byte, KeySize)
	rand.Read(key)
	c, err := New(key)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, BlockSize)
	b.SetBytes(BlockSize)
	for i := 0; i < b.N; i++ {
		if enc {
			c.EncryptBlocks(buf, buf, uint64(i))
		} else {
			c.DecryptBlocks(buf, buf, uint64(i))
		}
	}
}
