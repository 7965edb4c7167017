package nbd

import (
	"encoding/binary"

	"errors"
	"fmt"
	"golang.org/x/sys/unix"

	"github.com/tdeshim/tdeshim/internal/bufpool"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// conn is one client connection. A single goroutine reads requests (and
// write payloads); each request then runs on its own goroutine, bounded by
// MaxInFlight, and replies as soon as it is done, in any order. Replies are
// whole messages written under wmu, so they never interleave.
type conn struct {
	srv      *Server
	nc       net.Conn
	log      *slog.Logger
	wmu      sync.Mutex
	sess     session
	stopping atomic.Bool
	inflight sync.WaitGroup
	active   atomic.Int32 // requests running on their own goroutine
	r        io.Reader    // request stream: nc, or a blocking dup of its fd
	rfdMu    sync.Mutex   // guards rfd against close/shutdown races
	rfd      int          // that dup, or -1
}

// inlineOK says whether r may run on the reader goroutine when nothing
// else of this connection is running: small reads and writes, and FLUSH
// (a client that flushes with nothing else in flight is waiting for it,
// as PostgreSQL's WAL fsync is).
func (c *conn) inlineOK(r *request) bool {
	switch r.typ {
	case cmdRead, cmdWrite:
		return r.flags&cfFUA == 0 && r.length <= inlineMax
	case cmdFlush:
		return inlineFlush
	}
	return false
}

// inlineFlush: see inlineOK; a variable so benchmarks can compare.
var inlineFlush = os.Getenv("TDESHIM_NO_INLINE_FLUSH") == ""

// coalesceMax is the largest reply copied into one buffer and sent with a
// single write rather than writev.
const coalesceMax = 64 << 10

// inlineMax is the largest request run on the reader goroutine.
const inlineMax = 64 << 10

type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
	data   []byte
}

// stop asks the connection to finish what it has read and end. Requests
// read after this are answered ESHUTDOWN.
func (c *conn) stop() {
	c.stopping.Store(true)
	// Unblock the reader; it then drains and disconnects.
	c.nc.SetReadDeadline(time.Now())
	c.rfdMu.Lock()
	if c.rfd >= 0 {
		unix.Shutdown(c.rfd, unix.SHUT_RD)
	}
	c.rfdMu.Unlock()
}

// blockingReader reads requests with plain blocking read(2) calls on a
// duplicate of the socket, from a goroutine locked to its thread. Go's
// netpoller would otherwise turn every request at queue depth 1 into
// read → EAGAIN → epoll wait → wake-up → read, which costs more than the
// request itself.
type blockingReader int

func (r blockingReader) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(int(r), p)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return 0, err
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// useBlockingReads switches the request stream to a blocking dup of the
// socket when the connection is a real socket.
func (c *conn) useBlockingReads() {
	c.r, c.rfd = c.nc, -1
	sc, ok := c.nc.(syscall.Conn)
	if !ok {
		return
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return
	}
	dup := -1
	raw.Control(func(fd uintptr) { dup, _ = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if dup < 0 {
		return
	}
	// O_NONBLOCK belongs to the open file, so the original descriptor
	// turns blocking too: replies then block in write(2) when the socket
	// buffer is full, which is what a thread-per-connection server does.
	if err := unix.SetNonblock(dup, false); err != nil {
		unix.Close(dup)
		return
	}
	c.r, c.rfd = blockingReader(dup), dup
}

func (c *conn) serve() {
	defer c.nc.Close()
	if err := c.negotiate(&c.sess); err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, errAbort) {
			c.log.Debug("negotiation ended", "err", err)
		}
		return
	}
	c.log.Debug("client attached", "structured", c.sess.structured, "block_status", c.sess.metaAlloc)
	c.rfdMu.Lock()
	c.useBlockingReads()
	if c.rfd >= 0 {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer func() {
			c.rfdMu.Lock()
			unix.Close(c.rfd)
			c.rfd = -1
			c.rfdMu.Unlock()
		}()
		if c.stopping.Load() {
			unix.Shutdown(c.rfd, unix.SHUT_RD)
		}
	}
	c.rfdMu.Unlock()
	sem := make(chan struct{}, c.srv.opt.MaxInFlight)
	defer c.inflight.Wait()
	hdr := make([]byte, requestHeaderSize)
	for {
		if _, err := io.ReadFull(c.r, hdr); err != nil {
			if !errors.Is(err, io.EOF) && !c.stopping.Load() {
				c.log.Debug("connection read failed", "err", err)
			}
			return
		}
		be := binary.BigEndian
		if be.Uint32(hdr[0:]) != magicRequest {
			c.log.Warn("bad request magic; disconnecting")
			return
		}
		r := &request{
			flags:  be.Uint16(hdr[4:]),
			typ:    be.Uint16(hdr[6:]),
			handle: be.Uint64(hdr[8:]),
			off:    be.Uint64(hdr[16:]),
			length: be.Uint32(hdr[24:]),
		}
		if r.typ == cmdWrite {
			if r.length > c.srv.opt.MaxPayload {
				// Read and drop what a well-behaved peer may send (up to
				// the 32 MiB any server must accept); beyond that, hang up.
				if r.length > defaultPayload {
					c.log.Warn("write payload too large; disconnecting", "length", r.length)
					return
				}
				if _, err := io.CopyN(io.Discard, c.r, int64(r.length)); err != nil {
					return
				}
				c.replyError(r, EINVAL, "write larger than the advertised maximum payload")
				continue
			}
			r.data = bufpool.Get(int(r.length))
			if _, err := io.ReadFull(c.r, r.data); err != nil {
				return
			}
		}
		if r.typ == cmdDisc {
			return // deferred Wait drains in-flight requests
		}
		if c.stopping.Load() {
			c.replyError(r, ESHUTDOWN, "server is shutting down")
			continue
		}
		// A small read or write arriving when nothing else is in flight
		// runs on this goroutine: handing it to another would cost a
		// cross-thread wake-up, which at queue depth 1 is most of the
		// latency. Anything else, or anything while others run, gets its
		// own goroutine so slow requests (FLUSH) never hold up others.
		if c.active.Load() == 0 && c.inlineOK(r) {
			c.handle(r)
			continue
		}
		sem <- struct{}{}
		c.inflight.Add(1)
		c.active.Add(1)
		go func() {
			defer func() { c.active.Add(-1); <-sem; c.inflight.Done() }()
			c.handle(r)
		}()
	}
}

// validate checks a request against the protocol and the export; a
// non-zero code is the error to reply.
func (c *conn) validate(r *request) (uint32, string) {
	size := uint64(c.srv.dev.Size())
	end := r.off + uint64(r.length)
	beyond := end < r.off || end > size
	aligned := r.off%MinBlock == 0 && uint64(r.length)%MinBlock == 0
	ro := c.srv.dev.ReadOnly()
	allowed := map[uint16]uint16{
		cmdRead:        cfDF,
		cmdWrite:       cfFUA,
		cmdFlush:       0,
		cmdTrim:        cfFUA,
		cmdWriteZeroes: cfFUA | cfNoHole | cfFastZero,
		cmdBlockStatus: cfReqOne,
	}
	mask, known := allowed[r.typ]
	switch {
	case !known:
		return EINVAL, fmt.Sprintf("unknown command %d", r.typ)
	case r.flags&^mask != 0:
		return EINVAL, fmt.Sprintf("flags %#x not valid for command %d", r.flags, r.typ)
	case r.flags&cfDF != 0 && !c.sess.structured:
		return EINVAL, "DF needs structured replies"
	}
	switch r.typ {
	case cmdRead:
		if r.length > c.srv.opt.MaxPayload {
			return EINVAL, "read larger than the maximum payload"
		}
		if beyond {
			return EINVAL, "read beyond the end of the export"
		}
		if !aligned {
			return EINVAL, "read not aligned to 512 bytes"
		}
	case cmdWrite, cmdWriteZeroes:
		if ro {
			return EPERM, "export is read-only"
		}
		if beyond {
			return ENOSPC, "write beyond the end of the export"
		}
		if !aligned {
			return EINVAL, "write not aligned to 512 bytes"
		}
	case cmdTrim:
		if ro {
			return EPERM, "export is read-only"
		}
		if beyond {
			return EINVAL, "trim beyond the end of the export"
		}
	case cmdBlockStatus:
		if !c.sess.metaAlloc {
			return EINVAL, "no metadata context negotiated"
		}
		if beyond || r.length == 0 {
			return EINVAL, "block status range is empty or beyond the end"
		}
	}
	return 0, ""
}

func (c *conn) handle(r *request) {
	defer func() {
		if r.data != nil {
			bufpool.Put(r.data)
		}
	}()
	if code, msg := c.validate(r); code != 0 {
		c.replyError(r, code, msg)
		return
	}
	d := c.srv.dev
	var err error
	switch r.typ {
	case cmdRead:
		c.read(r)
		return
	case cmdWrite:
		err = d.WriteAt(r.data, int64(r.off), r.flags&cfFUA != 0)
	case cmdFlush:
		err = d.Flush()
	case cmdTrim:
		err = d.Trim(int64(r.off), int64(r.length), r.flags&cfFUA != 0)
	case cmdWriteZeroes:
		err = d.Zero(int64(r.off), int64(r.length), r.flags&cfNoHole != 0, r.flags&cfFastZero != 0, r.flags&cfFUA != 0)
	case cmdBlockStatus:
		c.blockStatus(r)
		return
	}
	if err != nil {
		code := codeOf(err)
		if code != ENOTSUP {
			c.log.Warn("request failed", "cmd", r.typ, "offset", r.off, "length", r.length, "err", err)
		}
		c.replyError(r, code, err.Error())
		return
	}
	c.replySimple(r.handle, 0, nil)
}

func (c *conn) read(r *request) {
	buf := bufpool.Get(int(r.length))
	defer bufpool.Put(buf)
	if err := c.srv.dev.ReadAt(buf, int64(r.off)); err != nil {
		c.log.Warn("read failed", "offset", r.off, "length", r.length, "err", err)
		c.replyError(r, codeOf(err), err.Error())
		return
	}
	if !c.sess.structured {
		c.replySimple(r.handle, 0, buf)
		return
	}
	// One data chunk carrying the whole range. (Hole chunks would save
	// bandwidth, but clients that care ask BLOCK_STATUS first.)
	hdr := make([]byte, 8)
	binary.BigEndian.PutUint64(hdr, r.off)
	c.replyChunk(r.handle, replyFlagDone, replyOffsetData, hdr, buf)
}

func (c *conn) blockStatus(r *request) {
	max := maxExtents
	if r.flags&cfReqOne != 0 {
		max = 1
	}
	ext, err := c.srv.dev.Extents(int64(r.off), int64(r.length), max)
	if err != nil || len(ext) == 0 {
		if err == nil {
			err = errors.New("no extents")
		}
		c.replyError(r, codeOf(err), err.Error())
		return
	}
	b := make([]byte, 4+8*len(ext))
	be := binary.BigEndian
	be.PutUint32(b, metaBaseAllocID)
	for i, e := range ext {
		var flags uint32
		if e.Hole {
			flags = stateHole | stateZero
		}
		be.PutUint32(b[4+8*i:], uint32(min(e.Length, 1<<32-PreferredBlock)))
		be.PutUint32(b[8+8*i:], flags)
	}
	c.replyChunk(r.handle, replyFlagDone, replyBlockStatus, b, nil)
}

// replyError answers with an error in the form the session requires: a
// structured error chunk once structured replies are on (mandatory for
// READ), a simple reply otherwise.
func (c *conn) replyError(r *request, code uint32, msg string) {
	if !c.sess.structured {
		c.replySimple(r.handle, code, nil)
		return
	}
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := make([]byte, 6+len(msg))
	binary.BigEndian.PutUint32(b, code)
	binary.BigEndian.PutUint16(b[4:], uint16(len(msg)))
	copy(b[6:], msg)
	c.replyChunk(r.handle, replyFlagDone, replyError, b, nil)
}

func (c *conn) replySimple(handle uint64, code uint32, payload []byte) {
	hdr := make([]byte, 16)
	be := binary.BigEndian
	be.PutUint32(hdr[0:], magicSimpleReply)
	be.PutUint32(hdr[4:], code)
	be.PutUint64(hdr[8:], handle)
	c.send(hdr, payload)
}

func (c *conn) replyChunk(handle uint64, flags, typ uint16, head, payload []byte) {
	hdr := make([]byte, 20, 20+len(head))
	be := binary.BigEndian
	be.PutUint32(hdr[0:], magicStructReply)
	be.PutUint16(hdr[4:], flags)
	be.PutUint16(hdr[6:], typ)
	be.PutUint64(hdr[8:], handle)
	be.PutUint32(hdr[16:], uint32(len(head)+len(payload)))
	c.send(append(hdr, head...), payload)
}

func (c *conn) send(hdr, payload []byte) {
	var err error
	if len(payload) <= coalesceMax {
		// One contiguous write: cheaper than writev for small replies.
		b := bufpool.Get(len(hdr) + len(payload))
		copy(b, hdr)
		copy(b[len(hdr):], payload)
		c.wmu.Lock()
		_, err = c.nc.Write(b)
		c.wmu.Unlock()
		bufpool.Put(b)
	} else {
		bufs := net.Buffers{hdr, payload}
		c.wmu.Lock()
		_, err = bufs.WriteTo(c.nc)
		c.wmu.Unlock()
	}
	if err != nil {
		// The peer is gone; the reader will notice and end the connection.
		c.nc.Close()
	}
}
