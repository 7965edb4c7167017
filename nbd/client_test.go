package nbd_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/nbd"
	"github.com/tdeshim/tdeshim/service"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

// rawClient speaks the protocol byte by byte, so tests can send what real
// clients never would.
type rawClient struct {
	t          testing.TB
	c          net.Conn
	structured bool
	size       uint64
	flags      uint16
}

const (
	cmdRead, cmdWrite, cmdDisc, cmdFlush, cmdTrim, cmdZero, cmdStatus = 0, 1, 2, 3, 4, 6, 7
)

type reply struct {
	handle uint64
	err    uint32
	data   []byte // read payload (simple) or chunk payload
	typ    uint16
}

type order interface {
	binary.ByteOrder
	binary.AppendByteOrder
}

func be() order { return binary.BigEndian }

// newVolume makes a small volume on a crash-model store. The key file is
// read and deleted at once: the provider keeps the key in memory.
func newVolume(tb testing.TB) (*store.Crash, *volume.Volume, string) {
	dir, err := os.MkdirTemp("", "tdeshim-nbd-test")
	if err != nil {
		tb.Fatal(err)
	}
	defer os.RemoveAll(dir)
	kf := filepath.Join(dir, "k")
	if err := keys.CreateKeyFile(kf); err != nil {
		tb.Fatal(err)
	}
	prov, err := keys.OpenFileProvider(kf)
	if err != nil {
		tb.Fatal(err)
	}
	raw, _ := os.ReadFile(kf)
	geo := layout.Geometry{Size: 8 << 20, Slots: 16, JournalBlocks: 16}
	st := store.NewCrash(make([]byte, geo.BackingSize()), 512)
	if err := volume.Create(context.Background(), st, geo, prov, nil); err != nil {
		tb.Fatal(err)
	}
	st.Sync()
	v, err := volume.Open(context.Background(), st, volume.Options{Provider: prov, Logger: quiet})
	if err != nil {
		tb.Fatal(err)
	}
	return st, v, string(raw)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// newFixture serves a fresh volume over a unix socket.
func newFixture(t testing.TB) (string, *store.Crash, *volume.Volume, string) {
	t.Helper()
	st, v, key := newVolume(t)
	srv := nbd.NewServer(service.Device{V: v}, nbd.Options{Logger: quiet})
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		v.Close()
	})
	return sock, st, v, key
}

func dial(t testing.TB, sock string, structured bool) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc := &rawClient{t: t, c: c}
	hello := make([]byte, 18)
	io.ReadFull(c, hello)
	if be().Uint64(hello) != 0x4e42444d41474943 || be().Uint16(hello[16:])&1 == 0 {
		t.Fatalf("bad greeting %x", hello)
	}
	c.Write([]byte{0, 0, 0, 3}) // fixed newstyle, no zeroes
	if structured {
		rc.option(8, nil)
		if typ, _ := rc.optReply(); typ != 1 {
			t.Fatalf("STRUCTURED_REPLY: reply type %d", typ)
		}
		rc.structured = true
		q := []byte("base:allocation")
		d := make([]byte, 0, 64)
		d = be().AppendUint32(d, 0)
		d = be().AppendUint32(d, 1)
		d = be().AppendUint32(d, uint32(len(q)))
		d = append(d, q...)
		rc.option(10, d)
		if typ, _ := rc.optReply(); typ != 4 {
			t.Fatalf("SET_META_CONTEXT: first reply type %d, want META_CONTEXT", typ)
		}
		rc.optReply() // ACK
	}
	go_ := make([]byte, 0, 16)
	go_ = be().AppendUint32(go_, 0)
	go_ = be().AppendUint16(go_, 0)
	rc.option(7, go_)
	for {
		typ, data := rc.optReply()
		if typ == 1 {
			break
		}
		if typ != 3 {
			t.Fatalf("GO: reply type %#x", typ)
		}
		if be().Uint16(data) == 0 {
			rc.size, rc.flags = be().Uint64(data[2:]), be().Uint16(data[10:])
		}
	}
	return rc
}

func (rc *rawClient) option(opt uint32, data []byte) {
	b := make([]byte, 16, 16+len(data))
	be().PutUint64(b, 0x49484156454F5054)
	be().PutUint32(b[8:], opt)
	be().PutUint32(b[12:], uint32(len(data)))
	rc.c.Write(append(b, data...))
}

func (rc *rawClient) optReply() (uint32, []byte) {
	h := make([]byte, 20)
	if _, err := io.ReadFull(rc.c, h); err != nil {
		rc.t.Fatalf("option reply: %v", err)
	}
	d := make([]byte, be().Uint32(h[16:]))
	io.ReadFull(rc.c, d)
	return be().Uint32(h[12:]), d
}

func (rc *rawClient) send(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	b := make([]byte, 28, 28+len(payload))
	be().PutUint32(b, 0x25609513)
	be().PutUint16(b[4:], flags)
	be().PutUint16(b[6:], typ)
	be().PutUint64(b[8:], handle)
	be().PutUint64(b[16:], off)
	be().PutUint32(b[24:], length)
	if _, err := rc.c.Write(append(b, payload...)); err != nil {
		rc.t.Fatalf("send: %v", err)
	}
}

// recv reads one reply; reads need the length they asked for (simple
// replies carry no length). Structured replies return their final chunk's
// type; data chunks are gathered.
func (rc *rawClient) recv(readLen map[uint64]uint32) reply {
	rc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	m := make([]byte, 4)
	if _, err := io.ReadFull(rc.c, m); err != nil {
		rc.t.Fatalf("recv: %v", err)
	}
	switch be().Uint32(m) {
	case 0x67446698:
		h := make([]byte, 12)
		io.ReadFull(rc.c, h)
		r := reply{err: be().Uint32(h), handle: be().Uint64(h[4:])}
		if n, ok := readLen[r.handle]; ok && r.err == 0 {
			r.data = make([]byte, n)
			io.ReadFull(rc.c, r.data)
		}
		return r
	case 0x668e33ef:
		var r reply
		for {
			h := make([]byte, 16)
			io.ReadFull(rc.c, h)
			flags, typ := be().Uint16(h), be().Uint16(h[2:])
			r.handle = be().Uint64(h[4:])
			d := make([]byte, be().Uint32(h[12:]))
			io.ReadFull(rc.c, d)
			r.typ = typ
			switch {
			case typ == 1:
				r.data = append(r.data, d[8:]...)
			case typ&0x8000 != 0:
				r.err = be().Uint32(d)
			default:
				r.data = append(r.data, d...)
			}
			if flags&1 != 0 {
				return r
			}
			if _, err := io.ReadFull(rc.c, m); err != nil {
				rc.t.Fatalf("recv chunk: %v", err)
			}
		}
	}
	rc.t.Fatalf("bad reply magic %x", m)
	return reply{}
}

type badRequest struct {
	name       string
	typ, flags uint16
	off        uint64
	length     uint32
	payload    []byte
	want       uint32
}

func TestBadRequestsGetErrorsOnALiveConnection(t *testing.T) {
	sock, _, _, _ := newFixture(t)
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			rc := dial(t, sock, structured)
			cases := []badRequest{
				{"unknown command", 42, 0, 0, 4096, nil, nbd.EINVAL},
				{"cache not offered", 5, 0, 0, 4096, nil, nbd.EINVAL},
				{"read past end", cmdRead, 0, rc.size, 4096, nil, nbd.EINVAL},
				{"read offset overflow", cmdRead, 0, ^uint64(0) - 100, 4096, nil, nbd.EINVAL},
				{"unaligned read", cmdRead, 0, 1, 3, nil, nbd.EINVAL},
				{"write past end", cmdWrite, 0, rc.size, 4096, make([]byte, 4096), nbd.ENOSPC},
				{"unaligned write", cmdWrite, 0, 7, 9, make([]byte, 9), nbd.EINVAL},
				{"unknown flag", cmdRead, 1 << 12, 0, 4096, nil, nbd.EINVAL},
				{"FUA on read", cmdRead, 1, 0, 4096, nil, nbd.EINVAL},
				{"trim past end", cmdTrim, 0, rc.size - 4096, 8192, nil, nbd.EINVAL},
				{"zero past end", cmdZero, 0, rc.size, 4096, nil, nbd.ENOSPC},
				{"huge read", cmdRead, 0, 0, 64 << 20, nil, nbd.EINVAL},
				{"fast zero that must write", cmdZero, 1<<1 | 1<<4, 0, 4096, nil, nbd.ENOTSUP},
			}
			if !structured {
				cases = append(cases,
					badRequest{"block status without context", cmdStatus, 0, 0, 4096, nil, nbd.EINVAL},
					badRequest{"DF without structured replies", cmdRead, 1 << 2, 0, 4096, nil, nbd.EINVAL})
			}
			for i, c := range cases {
				rc.send(c.typ, c.flags, uint64(i+100), c.off, c.length, c.payload)
				r := rc.recv(nil)
				if r.handle != uint64(i+100) || r.err != c.want {
					t.Errorf("%s: handle %d error %d, want handle %d error %d", c.name, r.handle, r.err, i+100, c.want)
				}
			}
			// Still alive: a write and a read of it.
			rc.send(cmdWrite, 0, 1, 8192, 4096, fill(4096, 0x3c))
			if r := rc.recv(nil); r.err != 0 {
				t.Fatalf("write after errors: %d", r.err)
			}
			rc.send(cmdRead, 0, 2, 8192, 4096, nil)
			if r := rc.recv(map[uint64]uint32{2: 4096}); r.err != 0 || r.data[0] != 0x3c || r.data[4095] != 0x3c {
				t.Fatalf("read after errors: err %d", r.err)
			}
		})
	}
}

func fill(n int, b byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = b
	}
	return p
}

// TestRepliesComeOutOfOrderAndAllArrive sends many requests before reading
// any reply and checks every handle is answered exactly once.
func TestRepliesComeOutOfOrderAndAllArrive(t *testing.T) {
	sock, _, _, _ := newFixture(t)
	rc := dial(t, sock, true)
	const n = 200
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < n; i++ {
			off := uint64(i%64) * 65536
			if i%3 == 0 {
				rc.send(cmdWrite, 0, uint64(i), off, 65536, fill(65536, byte(i)))
			} else if i%3 == 1 {
				rc.send(cmdRead, 0, uint64(i), off, 65536, nil)
			} else {
				rc.send(cmdFlush, 0, uint64(i), 0, 0, nil)
			}
		}
	}()
	seen := map[uint64]bool{}
	for i := 0; i < n; i++ {
		r := rc.recv(nil)
		if r.err != 0 || seen[r.handle] {
			t.Fatalf("handle %d: err %d dup %v", r.handle, r.err, seen[r.handle])
		}
		seen[r.handle] = true
	}
	wg.Wait()
}

// TestFlushCoversWritesOnOtherConnections: a write acknowledged on one
// connection and a FLUSH on another; power loss right after the flush
// reply; the write must be there.
func TestFlushCoversWritesOnOtherConnections(t *testing.T) {
	sock, st, _, key := newFixture(t)
	a := dial(t, sock, false)
	b := dial(t, sock, true)
	if a.flags&(1<<8) == 0 {
		t.Fatal("multi-conn not advertised")
	}
	for i := 0; i < 16; i++ {
		a.send(cmdWrite, 0, uint64(i), uint64(i)*4096*3, 4096, fill(4096, byte(0x40+i)))
		if r := a.recv(nil); r.err != 0 {
			t.Fatal(r.err)
		}
	}
	b.send(cmdFlush, 0, 99, 0, 0, nil)
	if r := b.recv(nil); r.err != 0 {
		t.Fatal(r.err)
	}
	img := st.Crash(newRand())
	v := reopen(t, img, key)
	buf := make([]byte, 4096)
	for i := 0; i < 16; i++ {
		v.ReadAt(buf, int64(i)*4096*3)
		if buf[0] != byte(0x40+i) || buf[4095] != byte(0x40+i) {
			t.Fatalf("write %d on connection A lost although connection B flushed", i)
		}
	}
}

func TestBlockStatusReportsHoles(t *testing.T) {
	sock, _, _, _ := newFixture(t)
	rc := dial(t, sock, true)
	rc.send(cmdWrite, 0, 1, 65536, 8192, fill(8192, 1))
	rc.recv(nil)
	rc.send(cmdStatus, 0, 2, 0, 1<<20, nil)
	r := rc.recv(nil)
	if r.err != 0 || r.typ != 5 {
		t.Fatalf("block status: err %d type %d", r.err, r.typ)
	}
	var got []string
	for d := r.data[4:]; len(d) >= 8; d = d[8:] {
		got = append(got, fmt.Sprintf("%d:%d", be().Uint32(d), be().Uint32(d[4:])))
	}
	want := "[65536:3 8192:0 974848:3]"
	if fmt.Sprint(got) != want {
		t.Fatalf("extents %v, want %s", got, want)
	}
	rc.send(cmdStatus, 1<<3, 3, 0, 1<<20, nil) // REQ_ONE
	if r := rc.recv(nil); len(r.data) != 12 {
		t.Fatalf("REQ_ONE gave %d bytes of descriptors", len(r.data)-4)
	}
}

func TestShutdownDrainsAndRefusesNewWork(t *testing.T) {
	sock, _, _, _ := newFixture(t)
	rc := dial(t, sock, false)
	rc.send(cmdWrite, 0, 1, 0, 4096, fill(4096, 9))
	if r := rc.recv(nil); r.err != 0 {
		t.Fatal(r.err)
	}
	rc.send(cmdDisc, 0, 2, 0, 0, nil)
	rc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := rc.c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after DISC: %v, want EOF", err)
	}
}
