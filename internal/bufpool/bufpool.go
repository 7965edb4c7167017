// Package bufpool recycles I/O buffers by power-of-two size class (4 KiB to
// 64 MiB), so the data path does not allocate per request.
package bufpool

import "sync"

const (
	minSize = 4096
	classes = 15 // 4 KiB << 14 = 64 MiB
)

var pools [classes]sync.Pool

func class(n int) int {
	c, size := 0, minSize
	for size < n {
		size <<= 1
		c++
	}
	return c
}

// Get returns a buffer of length n (contents undefined).
func Get(n int) []byte {
	c := class(n)
	if c >= classes {
		return make([]byte, n)
	}
	if b, ok := pools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, minSize<<c)
}

// Put recycles a buffer obtained from Get.
func Put(b []byte) {
	c := class(cap(b))
	if c >= classes || cap(b) != minSize<<c {
		return
	}
	b = b[:cap(b)]
	pools[c].Put(&b)
}
