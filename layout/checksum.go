package layout

import "hash/crc32"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc is CRC32C, the checksum of every on-disk structure.
func crc(parts ...[]byte) uint32 {
	var c uint32
	for _, p := range parts {
		c = crc32.Update(c, castagnoli, p)
	}
	return c
}
