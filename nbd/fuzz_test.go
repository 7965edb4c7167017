package nbd_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/nbd"
	"github.com/tdeshim/tdeshim/service"
)

var (
	fuzzOnce sync.Once
	fuzzSrv  *nbd.Server
)

// fuzzServer is one server over a real volume, shared by all inputs.
func fuzzServer(t *testing.T) *nbd.Server {
	fuzzOnce.Do(func() {
		// Lives as long as the fuzzing process; nothing on disk.
		_, v, _ := newVolume(t)
		fuzzSrv = nbd.NewServer(service.Device{V: v}, nbd.Options{Logger: quiet})
	})
	return fuzzSrv
}

// feed plays in as the client's bytes and drains the server's replies
// until it hangs up or goes quiet. The server must not panic or hang.
func feed(t *testing.T, srv *nbd.Server, in []byte) {
	cli, sv := net.Pipe()
	done := make(chan struct{})
	go func() { srv.ServeConn(sv); close(done) }()
	go io.Copy(io.Discard, cli)
	cli.SetWriteDeadline(time.Now().Add(2 * time.Second))
	cli.Write(in)
	cli.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("server did not end the connection after the client closed")
	}
}

func optionBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, 0x49484156454F5054)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func FuzzNegotiation(f *testing.F) {
	f.Add(append([]byte{0, 0, 0, 3}, optionBytes(7, []byte{0, 0, 0, 0, 0, 0})...))
	f.Add(append([]byte{0, 0, 0, 1}, optionBytes(1, nil)...))
	f.Add(append([]byte{0, 0, 0, 1}, append(optionBytes(8, nil), optionBytes(10, []byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15})...)...))
	f.Add(append([]byte{0, 0, 0, 1}, optionBytes(3, nil)...))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) { feed(t, fuzzServer(t), in) })
}

func requestBytes(typ, flags uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

// FuzzRequests negotiates properly, then sends arbitrary request bytes.
func FuzzRequests(f *testing.F) {
	f.Add(requestBytes(1, 0, 1, 0, 4096, bytes.Repeat([]byte{7}, 4096)))
	f.Add(requestBytes(0, 4, 2, 4096, 512, nil))
	f.Add(requestBytes(7, 8, 3, 0, 1<<20, nil))
	f.Add(requestBytes(6, 0x12, 4, 0, 8192, nil))
	f.Add(requestBytes(4, 1, 5, 1<<22, 1<<30, nil))
	f.Add(requestBytes(1, 0, 6, 100, 0xffffffff, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		hs := []byte{0, 0, 0, 3}
		hs = append(hs, optionBytes(8, nil)...)
		hs = append(hs, optionBytes(10, append([]byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15}, "base:allocation"...))...)
		hs = append(hs, optionBytes(7, []byte{0, 0, 0, 0, 0, 0})...)
		feed(t, fuzzServer(t), append(hs, in...))
	})
}
