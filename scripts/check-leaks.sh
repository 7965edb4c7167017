#!/usr/bin/env bash
# Fails if tests left loop devices over nbdfuse files, FUSE mounts or
# tdeshim/nbdfuse processes behind: there are only eight loop devices.
set -u
bad=0
if losetup -a 2>/dev/null | grep -E '/nbd(\)|$| )' ; then echo "leak: loop device over an nbdfuse file" >&2; bad=1; fi
if grep -E ' fuse(\.nbdfuse)? |nbdfuse' /proc/self/mounts; then echo "leak: FUSE mount" >&2; bad=1; fi
if pgrep -a nbdfuse; then echo "leak: nbdfuse process" >&2; bad=1; fi
if pgrep -af 'tdeshim serve'; then echo "leak: tdeshim serve process" >&2; bad=1; fi
exit $bad
