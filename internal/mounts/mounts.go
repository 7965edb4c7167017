// Package mounts reads the kernel's mount table (/proc/self/mounts) for
// the commands that attach and mount volumes and for the watcher that
// waits for one: the one place that parses it and undoes its octal
// escapes (a space in a path is written \040).
package mounts

import (
	"os"
	"strconv"
	"strings"
)

// Mount is one line of the table.
type Mount struct {
	Source, Point string
}

// List returns the current mounts.
func List() ([]Mount, error) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	var out []Mount
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			out = append(out, Mount{Source: unescape(f[0]), Point: unescape(f[1])})
		}
	}
	return out, nil
}

// IsMountPoint reports whether something is mounted on dir.
func IsMountPoint(dir string) (bool, error) {
	ms, err := List()
	for _, m := range ms {
		if m.Point == dir {
			return true, nil
		}
	}
	return false, err
}

// MountedAt reports where source (a device) is mounted, if it is.
func MountedAt(source string) (string, bool) {
	ms, _ := List()
	for _, m := range ms {
		if m.Source == source {
			return m.Point, true
		}
	}
	return "", false
}

// unescape undoes the table's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
