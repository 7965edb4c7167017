# Driven by TestLibnbdInFlightAndErrorReplies: 64 writes in flight on one
# connection, then requests that must get error replies while the
# connection stays usable. Exits non-zero with a message on any failure.
import errno
import sys

import nbd

uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)  # let bad requests reach the server
h.connect_uri(uri)
size = h.get_size()

# 64 writes in flight, each a distinct 64 KiB pattern.
N, L = 64, 65536
bufs = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([(i * 7 + 1) & 0xFF]) * L)
    bufs.append(b)
    h.aio_pwrite(b, i * L)
assert h.aio_in_flight() > 1, "requests were not in flight together"
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
for i in range(N):
    got = h.pread(L, i * L)
    if got != bytes([(i * 7 + 1) & 0xFF]) * L:
        sys.exit(f"block {i} read back wrong after concurrent writes")


def expect(code, fn, what):
    try:
        fn()
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        if got != code:
            sys.exit(f"{what}: errno {e.errno} ({e.string}), want {code}")
        return
    sys.exit(f"{what}: succeeded, want errno {code}")


expect(errno.EINVAL, lambda: h.pread(4096, size), "read past end")
expect(errno.EINVAL, lambda: h.pread(4096, size - 2048), "read across end")
expect(errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size), "write past end")
expect(errno.EINVAL, lambda: h.pread(3, 1), "unaligned read")
expect(errno.EINVAL, lambda: h.pwrite(b"abc", 1), "unaligned write")
expect(errno.EINVAL, lambda: h.trim(4096, size), "trim past end")
expect(errno.EINVAL, lambda: h.pread(4096, 0, flags=1 << 9), "unknown read flag")
expect(errno.EINVAL, lambda: h.pwrite(b"y" * 4096, 0, flags=nbd.CMD_FLAG_DF), "flag not valid for write")
expect(errno.EINVAL, lambda: h.zero(4096, 0, flags=nbd.CMD_FLAG_REQ_ONE), "flag not valid for zero")
expect(errno.ENOTSUP, lambda: h.zero(4096, 0, flags=nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO), "fast zero that must write")

# The connection is still alive and correct.
if h.pread(L, 0) != bytes([1]) * L:
    sys.exit("connection unusable after error replies")
h.shutdown()
print("ok")
