//go:build !cgo

package crypto

import "errors"

func newOpenSSL(key []byte) (Cipher, error) {
	return nil, errors.New("crypto: built without cgo, OpenSSL engine unavailable")
}
