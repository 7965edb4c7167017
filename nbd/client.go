package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// Export is what a client handshake learns about an export.
type Export struct {
	Size  uint64
	Flags uint16 // transmission flags, as the kernel NBD client takes them
}

// ClientHandshake negotiates fixed newstyle with OPT_GO on c and leaves it
// in the transmission phase, with simple replies (the kernel client does
// not speak structured replies). It is what `tdeshim attach --via kernel`
// does for every connection before handing the sockets to the kernel.
func ClientHandshake(c net.Conn, export string) (Export, error) {
	be := binary.BigEndian
	var hello [18]byte
	if _, err := io.ReadFull(c, hello[:]); err != nil {
		return Export{}, fmt.Errorf("nbd handshake: %w", err)
	}
	if be.Uint64(hello[0:]) != magicNBD || be.Uint64(hello[8:]) != magicOption {
		return Export{}, errors.New("nbd handshake: not a newstyle NBD server")
	}
	sflags := be.Uint16(hello[16:])
	if sflags&flagFixedNewstyle == 0 {
		return Export{}, errors.New("nbd handshake: server lacks fixed newstyle")
	}
	cflags := clientFixed
	if sflags&flagNoZeroes != 0 {
		cflags |= clientNoZeroes
	}
	req := be.AppendUint32(nil, cflags)
	opt := be.AppendUint32(nil, uint32(len(export)))
	opt = append(opt, export...)
	opt = be.AppendUint16(opt, 1)
	opt = be.AppendUint16(opt, infoBlockSize)
	req = be.AppendUint64(req, magicOption)
	req = be.AppendUint32(req, optGo)
	req = be.AppendUint32(req, uint32(len(opt)))
	req = append(req, opt...)
	if _, err := c.Write(req); err != nil {
		return Export{}, fmt.Errorf("nbd handshake: %w", err)
	}
	var ex Export
	got := false
	for i := 0; i < 64; i++ {
		var h [20]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return Export{}, fmt.Errorf("nbd handshake: %w", err)
		}
		if be.Uint64(h[0:]) != magicOptReply || be.Uint32(h[8:]) != optGo {
			return Export{}, errors.New("nbd handshake: unexpected option reply")
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if n > maxOptionLen {
			return Export{}, errors.New("nbd handshake: oversized option reply")
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c, data); err != nil {
			return Export{}, fmt.Errorf("nbd handshake: %w", err)
		}
		switch {
		case typ == repAck:
			if !got {
				return Export{}, errors.New("nbd handshake: server sent no export information")
			}
			return ex, nil
		case typ == repInfo && len(data) >= 12 && be.Uint16(data) == infoExport:
			ex.Size, ex.Flags, got = be.Uint64(data[2:]), be.Uint16(data[10:]), true
		case typ&(1<<31) != 0:
			return Export{}, fmt.Errorf("nbd handshake: server refused export %q: %s", export, data)
		}
	}
	return Export{}, errors.New("nbd handshake: too many option replies")
}
