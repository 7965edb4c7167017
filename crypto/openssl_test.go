//go:build cgo

package crypto

import "testing"

func unitEncrypt(t *testing.T, c Cipher, dst, src []byte, unit int, tweak uint64) {
	s, ok := c.(*sslCipher)
	if !ok {
		t.Fatalf("unexpected engine %T", c)
	}
	s.units(dst, src, unit, tweak, true)
}
