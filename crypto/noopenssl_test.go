//go:build !cgo

package crypto

import "testing"

func unitEncrypt(t *testing.T, c Cipher, dst, src []byte, unit int, tweak uint64) {
	t.Fatalf("no second engine without cgo, got %T", c)
}
