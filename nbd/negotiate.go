package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

var errAbort = errors.New("nbd: client aborted negotiation")

// session is what negotiation settles.
type session struct {
	structured bool
	metaAlloc  bool // base:allocation selected
	noZeroes   bool
}

func (c *conn) transmissionFlags(s *session) uint16 {
	f := tfHasFlags | tfSendFlush | tfCanMultiConn
	if c.srv.dev.ReadOnly() {
		f |= tfReadOnly
	} else {
		f |= tfSendFUA | tfSendTrim | tfSendWriteZeroes | tfSendFastZero
	}
	if s.structured {
		f |= tfSendDF
	}
	return f
}

// negotiate runs the fixed-newstyle handshake. It returns nil when the
// client has chosen the export and transmission starts.
func (c *conn) negotiate(s *session) error {
	var hello [18]byte
	be := binary.BigEndian
	be.PutUint64(hello[0:], magicNBD)
	be.PutUint64(hello[8:], magicOption)
	be.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.nc, cf[:]); err != nil {
		return err
	}
	flags := be.Uint32(cf[:])
	if flags&^(clientFixed|clientNoZeroes) != 0 {
		return fmt.Errorf("nbd: unknown client flags %#x", flags)
	}
	s.noZeroes = flags&clientNoZeroes != 0
	for n := 0; n < maxOptions; n++ {
		var oh [16]byte
		if _, err := io.ReadFull(c.nc, oh[:]); err != nil {
			return err
		}
		if be.Uint64(oh[0:]) != magicOption {
			return errors.New("nbd: bad option magic")
		}
		opt, length := be.Uint32(oh[8:]), be.Uint32(oh[12:])
		if length > maxOptionLen {
			// Too big to read safely; say so and hang up.
			c.optReply(opt, repErrTooBig, []byte("option too large"))
			return fmt.Errorf("nbd: option %d of %d bytes", opt, length)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.nc, data); err != nil {
			return err
		}
		done, err := c.option(s, opt, data)
		if err != nil || done {
			return err
		}
	}
	return errors.New("nbd: too many options")
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20+len(data))
	be := binary.BigEndian
	be.PutUint64(b[0:], magicOptReply)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], typ)
	be.PutUint32(b[16:], uint32(len(data)))
	copy(b[20:], data)
	_, err := c.nc.Write(b)
	return err
}

func (c *conn) optError(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(msg))
}

func (c *conn) knownExport(name string) bool {
	return name == "" || name == c.srv.opt.ExportName
}

// option handles one option; done means transmission begins.
func (c *conn) option(s *session, opt uint32, data []byte) (bool, error) {
	be := binary.BigEndian
	switch opt {
	case optExportName:
		if !c.knownExport(string(data)) {
			return false, fmt.Errorf("nbd: unknown export %q", data)
		}
		b := make([]byte, 10, 10+124)
		be.PutUint64(b[0:], uint64(c.srv.dev.Size()))
		be.PutUint16(b[8:], c.transmissionFlags(s))
		if !s.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		_, err := c.nc.Write(b)
		return err == nil, err

	case optAbort:
		c.optReply(opt, repAck, nil)
		return false, errAbort

	case optList:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "LIST takes no data")
		}
		name := c.srv.opt.ExportName
		b := make([]byte, 4+len(name))
		be.PutUint32(b, uint32(len(name)))
		copy(b[4:], name)
		if err := c.optReply(opt, repServer, b); err != nil {
			return false, err
		}
		return false, c.optReply(opt, repAck, nil)

	case optInfo, optGo:
		return c.infoGo(s, opt, data)

	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		s.structured = true
		return false, c.optReply(opt, repAck, nil)

	case optListMetaContext, optSetMetaContext:
		return false, c.metaContext(s, opt, data)

	case optStartTLS:
		return false, c.optError(opt, repErrPolicy, "TLS is not offered on this listener; tdeshim serves plaintext over a local socket")

	default:
		return false, c.optError(opt, repErrUnsup, "option not supported")
	}
}

func (c *conn) infoGo(s *session, opt uint32, data []byte) (bool, error) {
	be := binary.BigEndian
	if len(data) < 6 {
		return false, c.optError(opt, repErrInvalid, "short INFO/GO request")
	}
	nameLen := be.Uint32(data)
	if uint64(nameLen)+6 > uint64(len(data)) {
		return false, c.optError(opt, repErrInvalid, "export name overruns request")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(be.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return false, c.optError(opt, repErrInvalid, "bad information request list")
	}
	if !c.knownExport(name) {
		return false, c.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	want := map[uint16]bool{}
	for i := 0; i < nreq; i++ {
		want[be.Uint16(rest[2+2*i:])] = true
	}
	exp := make([]byte, 12)
	be.PutUint16(exp[0:], infoExport)
	be.PutUint64(exp[2:], uint64(c.srv.dev.Size()))
	be.PutUint16(exp[10:], c.transmissionFlags(s))
	if err := c.optReply(opt, repInfo, exp); err != nil {
		return false, err
	}
	if want[infoName] {
		b := append([]byte{0, byte(infoName)}, c.srv.opt.ExportName...)
		if err := c.optReply(opt, repInfo, b); err != nil {
			return false, err
		}
	}
	if want[infoDescription] && c.srv.opt.Description != "" {
		b := append([]byte{0, byte(infoDescription)}, c.srv.opt.Description...)
		if err := c.optReply(opt, repInfo, b); err != nil {
			return false, err
		}
	}
	// Always sent: clients that honour it never send sub-sector requests.
	bs := make([]byte, 14)
	be.PutUint16(bs[0:], infoBlockSize)
	be.PutUint32(bs[2:], MinBlock)
	be.PutUint32(bs[6:], PreferredBlock)
	be.PutUint32(bs[10:], c.srv.opt.MaxPayload)
	if err := c.optReply(opt, repInfo, bs); err != nil {
		return false, err
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	return opt == optGo, nil
}

// metaContext handles LIST and SET: the only context is base:allocation.
func (c *conn) metaContext(s *session, opt uint32, data []byte) error {
	be := binary.BigEndian
	if opt == optSetMetaContext && !s.structured {
		return c.optError(opt, repErrInvalid, "negotiate structured replies first")
	}
	if len(data) < 8 {
		return c.optError(opt, repErrInvalid, "short meta context request")
	}
	nameLen := be.Uint32(data)
	if uint64(nameLen)+8 > uint64(len(data)) {
		return c.optError(opt, repErrInvalid, "export name overruns request")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nq := be.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < nq; i++ {
		if len(rest) < 4 {
			return c.optError(opt, repErrInvalid, "query overruns request")
		}
		ql := be.Uint32(rest)
		if uint64(ql)+4 > uint64(len(rest)) {
			return c.optError(opt, repErrInvalid, "query overruns request")
		}
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	if len(rest) != 0 {
		return c.optError(opt, repErrInvalid, "trailing bytes in meta context request")
	}
	if !c.knownExport(name) {
		return c.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	match := false
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	for _, q := range queries {
		if q == metaBaseAlloc || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if opt == optSetMetaContext {
		s.metaAlloc = match
	}
	if match {
		b := make([]byte, 4+len(metaBaseAlloc))
		be.PutUint32(b, metaBaseAllocID)
		copy(b[4:], metaBaseAlloc)
		if err := c.optReply(opt, repMetaContext, b); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}
