// Package nbd is tdeshim's NBD server: fixed-newstyle negotiation,
// structured replies with base:allocation block status, many requests in
// flight per connection with out-of-order replies, FLUSH/FUA/TRIM/
// WRITE_ZEROES, and an error reply (never a dropped connection) for any bad
// request that can be answered. It knows nothing of encryption: it serves a
// Device.
//
// go-nbd (github.com/pojntfx/go-nbd v0.3.2) supplies the magic numbers and
// the handful of constants it defines; the rest of the protocol (commands
// past DISC, command flags, structured replies, meta contexts, error codes)
// is defined here from the NBD protocol document, because go-nbd's server
// implements none of it.
package nbd

import gonbd "github.com/pojntfx/go-nbd/pkg/protocol"

// Magic numbers.
const (
	magicNBD         = gonbd.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	magicOption      = gonbd.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	magicOptReply    = gonbd.NEGOTIATION_MAGIC_REPLY
	magicRequest     = gonbd.TRANSMISSION_MAGIC_REQUEST
	magicSimpleReply = gonbd.TRANSMISSION_MAGIC_REPLY
	magicStructReply = uint32(0x668e33ef)
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = gonbd.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes      = uint16(1 << 1)
	clientFixed       = uint32(1 << 0)
	clientNoZeroes    = uint32(1 << 1)
)

// Options.
const (
	optExportName      = uint32(1)
	optAbort           = gonbd.NEGOTIATION_ID_OPTION_ABORT
	optList            = gonbd.NEGOTIATION_ID_OPTION_LIST
	optStartTLS        = uint32(5)
	optInfo            = gonbd.NEGOTIATION_ID_OPTION_INFO
	optGo              = gonbd.NEGOTIATION_ID_OPTION_GO
	optStructuredReply = uint32(8)
	optListMetaContext = uint32(9)
	optSetMetaContext  = uint32(10)
)

// Option reply types.
const (
	repAck         = gonbd.NEGOTIATION_TYPE_REPLY_ACK
	repServer      = gonbd.NEGOTIATION_TYPE_REPLY_SERVER
	repInfo        = gonbd.NEGOTIATION_TYPE_REPLY_INFO
	repMetaContext = uint32(4)
	repErrUnsup    = gonbd.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	repErrPolicy   = uint32(2 | 1<<31)
	repErrInvalid  = uint32(3 | 1<<31)
	repErrUnknown  = gonbd.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	repErrTooBig   = uint32(9 | 1<<31)
)

// Info types.
const (
	infoExport      = gonbd.NEGOTIATION_TYPE_INFO_EXPORT
	infoName        = gonbd.NEGOTIATION_TYPE_INFO_NAME
	infoDescription = gonbd.NEGOTIATION_TYPE_INFO_DESCRIPTION
	infoBlockSize   = gonbd.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags.
const (
	tfHasFlags        = uint16(1 << 0)
	tfReadOnly        = uint16(1 << 1)
	tfSendFlush       = uint16(1 << 2)
	tfSendFUA         = uint16(1 << 3)
	tfSendTrim        = uint16(1 << 5)
	tfSendWriteZeroes = uint16(1 << 6)
	tfSendDF          = uint16(1 << 7)
	tfCanMultiConn    = uint16(1 << 8)
	tfSendFastZero    = uint16(1 << 11)
)

// Commands.
const (
	cmdRead        = gonbd.TRANSMISSION_TYPE_REQUEST_READ
	cmdWrite       = gonbd.TRANSMISSION_TYPE_REQUEST_WRITE
	cmdDisc        = gonbd.TRANSMISSION_TYPE_REQUEST_DISC
	cmdFlush       = uint16(3)
	cmdTrim        = uint16(4)
	cmdWriteZeroes = uint16(6)
	cmdBlockStatus = uint16(7)
)

// Command flags.
const (
	cfFUA      = uint16(1 << 0)
	cfNoHole   = uint16(1 << 1)
	cfDF       = uint16(1 << 2)
	cfReqOne   = uint16(1 << 3)
	cfFastZero = uint16(1 << 4)
)

// Structured reply chunk types and flags.
const (
	replyFlagDone     = uint16(1 << 0)
	replyNone         = uint16(0)
	replyOffsetData   = uint16(1)
	replyOffsetHole   = uint16(2)
	replyBlockStatus  = uint16(5)
	replyError        = uint16(1<<15 + 1)
	stateHole         = uint32(1 << 0)
	stateZero         = uint32(1 << 1)
	metaBaseAlloc     = "base:allocation"
	metaBaseAllocID   = uint32(1)
	requestHeaderSize = 28
)

// Error codes carried in replies.
const (
	EPERM     = gonbd.TRANSMISSION_ERROR_EPERM
	EIO       = uint32(5)
	ENOMEM    = uint32(12)
	EINVAL    = gonbd.TRANSMISSION_ERROR_EINVAL
	ENOSPC    = uint32(28)
	EOVERFLOW = uint32(75)
	ENOTSUP   = uint32(95)
	ESHUTDOWN = uint32(108)
)
