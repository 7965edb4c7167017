package volume

import "sync"

// Buffers are pooled by power-of-two size class, 4 KiB to 64 MiB, so the
// data path does not allocate per request.
var pools [15]sync.Pool

func class(n int) int {
	c, size := 0, 4096
	for size < n {
		size <<= 1
		c++
	}
	return c
}

func getBuf(n int) []byte {
	c := class(n)
	if c >= len(pools) {
		return make([]byte, n)
	}
	if b, ok := pools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 4096<<c)
}

func putBuf(b []byte) {
	c := class(cap(b))
	if c >= len(pools) || cap(b) != 4096<<c {
		return
	}
	b = b[:cap(b)]
	pools[c].Put(&b)
}
