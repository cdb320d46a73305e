"""The NBD protocol's numbers and wire structures, shared by the client (nbd.py) and the
server (nbdserver.py): https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
(fixed newstyle handshake, structured replies, meta contexts, block status)."""

from __future__ import annotations

import errno
import struct

# --- public flag constants -------------------------------------------------------------------

STATE_HOLE = 1
"""``base:allocation``: the extent is unallocated (a hole)."""
STATE_ZERO = 2
"""``base:allocation``: the extent reads as zeros."""
DIRTY = 1
"""``qemu:dirty-bitmap:NAME``: flag bit 1 (value 1) means the extent is dirty."""

# --- handshake ---------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

OPT_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6

REP_ERR_NAMES = {
    REP_FLAG_ERROR | 1: "NBD_REP_ERR_UNSUP",
    REP_FLAG_ERROR | 2: "NBD_REP_ERR_POLICY",
    REP_FLAG_ERROR | 3: "NBD_REP_ERR_INVALID",
    REP_FLAG_ERROR | 4: "NBD_REP_ERR_PLATFORM",
    REP_FLAG_ERROR | 5: "NBD_REP_ERR_TLS_REQD",
    REP_FLAG_ERROR | 6: "NBD_REP_ERR_UNKNOWN",
    REP_FLAG_ERROR | 7: "NBD_REP_ERR_SHUTDOWN",
    REP_FLAG_ERROR | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_FLAG_ERROR | 9: "NBD_REP_ERR_TOO_BIG",
    REP_FLAG_ERROR | 10: "NBD_REP_ERR_EXT_HEADER_REQD",
}

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# --- transmission ------------------------------------------------------------------------------

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_WRITE_ZEROES = 1 << 6

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "NBD_CMD_READ",
    CMD_WRITE: "NBD_CMD_WRITE",
    CMD_DISC: "NBD_CMD_DISC",
    CMD_FLUSH: "NBD_CMD_FLUSH",
    CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# NBD wire error numbers -> local errno, for messages.
NBD_ERRNO = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.EOPNOTSUPP,
    108: errno.ESHUTDOWN,
}

MAX_BLOCK_SIZE = 32 * 1024 * 1024
"""Largest READ/WRITE payload sent in one request (servers commonly refuse more)."""
MAX_STATUS_REQUEST = 1 << 31  # BLOCK_STATUS length is 32 bits on the wire

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
U64_U32 = struct.Struct(">QI")
GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
INFO_EXPORT_S = struct.Struct(">QH")
INFO_BLOCK_SIZE_S = struct.Struct(">III")
REQUEST = struct.Struct(">IHHQQI")
REPLY_PREFIX = struct.Struct(">IHHQ")  # first 16 bytes of either reply kind
SIMPLE_REPLY = struct.Struct(">IIQ")
EXTENT = struct.Struct(">II")
ERROR_HEAD = struct.Struct(">IH")
EXPORT_NAME_REPLY = struct.Struct(">QH")

# options and replies only a server needs
OPT_LIST = 3
OPT_INFO = 6
OPT_LIST_META_CONTEXT = 9
REP_SERVER = 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
INFO_NAME = 1
TFLAG_CAN_MULTI_CONN = 1 << 8
CMD_FLAG_REQ_ONE = 1 << 3
EPERM = 1
EIO = 5
EINVAL = 22
BASE_ALLOCATION = "base:allocation"
