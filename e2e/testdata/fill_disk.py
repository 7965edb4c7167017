# Driven by TestFullBackingDiskGivesENOSPCAndLosesNothing.
import errno
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
MB = 1 << 20
n = 0
while True:
    try:
        h.pwrite(bytes([n % 251 + 1]) * MB, n * MB)
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        if got != errno.ENOSPC:
            sys.exit(f"write {n}: errno {e.errno}, want ENOSPC")
        break
    n += 1
    if n * MB >= h.get_size():
        sys.exit("volume filled before the backing disk did; test sizes are wrong")
if n < 4:
    sys.exit(f"only {n} MiB written before ENOSPC")
h.flush()
for i in range(n):
    if h.pread(MB, i * MB) != bytes([i % 251 + 1]) * MB:
        sys.exit(f"chunk {i} damaged after ENOSPC")
# Free half, flush (holes are punched after the commit), write again.
h.trim((n // 2) * MB, 0)
h.flush()
h.pwrite(b"\x77" * MB, n * MB)
h.flush()
if h.pread(MB, n * MB) != b"\x77" * MB:
    sys.exit("write after freeing space reads back wrong")
print("ok", n)
