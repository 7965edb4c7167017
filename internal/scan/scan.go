// Package scan looks for plaintext in a backing file or device, streaming
// through it in large chunks: the check behind "nothing plaintext at rest"
// in the demo and the end-to-end tests.
package scan

import (
	"bytes"
	"os"
)

const chunk = 8 << 20

// Each calls fn with every occurrence of any of the needles in the file at
// path (which needle, and its byte offset), in one pass; fn returns false
// to stop.
func Each(path string, needles [][]byte, fn func(which int, off int64) bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	longest := 1
	for _, s := range needles {
		longest = max(longest, len(s))
	}
	buf := make([]byte, chunk+longest)
	carry, base := 0, int64(0) // base: file offset of buf[0]
	for {
		n, rerr := f.ReadAt(buf[carry:], base+int64(carry))
		data := buf[:carry+n]
		for w, s := range needles {
			for i := 0; ; {
				j := bytes.Index(data[i:], s)
				if j < 0 {
					break
				}
				// A match wholly inside the carried tail was seen last round.
				if i+j+len(s) > carry && !fn(w, base+int64(i+j)) {
					return nil
				}
				i += j + len(s)
			}
		}
		if rerr != nil || n == 0 {
			return nil
		}
		// Keep a tail shorter than the longest needle: a match across
		// chunks is found whole in the next round.
		keep := min(longest-1, len(data))
		copy(buf, data[len(data)-keep:])
		base += int64(len(data) - keep)
		carry = keep
	}
}

// Count returns how often s occurs in the file at path.
func Count(path string, s []byte) (int, error) {
	n := 0
	err := Each(path, [][]byte{s}, func(int, int64) bool { n++; return true })
	return n, err
}

// First returns which needle occurs first found and where, or -1, -1.
func First(path string, needles ...[]byte) (int, int64, error) {
	which, at := -1, int64(-1)
	err := Each(path, needles, func(w int, off int64) bool { which, at = w, off; return false })
	return which, at, err
}
