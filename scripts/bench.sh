#!/usr/bin/env bash
# make bench: tdeshim against its anchors, in one run on this machine.
#   crypto   AES-256-XTS 4 KiB MB/s, tdeshim engine vs `openssl speed`
#   nbdcopy  1 GiB write (with flush) and read, tdeshim vs `nbdkit file`
#   fio      4 KiB random read/write, iodepth 1 and 16, on ext4 over
#            nbdfuse + loop (direct I/O), tdeshim vs nbdkit
#   pg       pgbench on ext4 over nbdfuse + loop: tdeshim (volume key
#            only) vs nbdkit; tdeshim with per-relation keys (serve
#            --watch) vs volume key only, with rekey amplification, lag
#            and key-map + index memory per TiB (from a 10 GiB volume)
# Prints a table of ratios (tdeshim / anchor) and writes it to
# bench-results/latest.txt. Set BENCH_QUICK=1 for a shorter run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin/tdeshim
WORK=$(mktemp -d /var/tmp/tdeshim-bench.XXXXXX)
chmod 755 "$WORK" # PostgreSQL (user postgres) runs below it
OUT=bench-results
mkdir -p "$OUT"
RES=$OUT/latest.txt
: >"$RES"
COPY_SIZE=${COPY_SIZE:-1G}
FIO_TIME=${FIO_TIME:-20}
[[ -n ${BENCH_QUICK:-} ]] && { COPY_SIZE=256M; FIO_TIME=5; }

pids=()
devs=()
mnts=()
cleanup() {
  for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for d in "${devs[@]}"; do "$BIN" detach "$d" 2>/dev/null || losetup -d "$d" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "== $*" >&2; }
# BENCH_ONLY="crypto open copy fio pg" picks sections (default: all).
want() { [[ -z ${BENCH_ONLY:-} || " $BENCH_ONLY " == *" $1 "* ]]; }
row() { printf '%-34s %12s %12s %8s\n' "$1" "$2" "$3" "$4" | tee -a "$RES"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

printf '%-34s %12s %12s %8s\n' "metric" "tdeshim" "anchor" "ratio" | tee -a "$RES"

# ---- crypto ---------------------------------------------------------------
if want crypto; then
log "crypto: tdeshim engine vs openssl speed (1 core, 4 KiB)"
ssl=$(openssl speed -evp aes-256-xts -bytes 4096 -seconds 3 2>/dev/null | awk '/^AES-256-XTS/ { sub(/k$/, "", $2); printf "%.0f", $2 * 1000 / 1e6 }')
gobench=$(go test ./crypto -run '^$' -bench 'Benchmark(En|De)crypt4K' -benchtime 2s -cpu 1 | awk '/MB\/s/ { print $1, $(NF-1) }')
enc=$(awk '/Encrypt/ { printf "%.0f", $2 }' <<<"$gobench")
dec=$(awk '/Decrypt/ { printf "%.0f", $2 }' <<<"$gobench")
row "AES-XTS encrypt MB/s (vs openssl)" "$enc" "$ssl" "$(ratio "$enc" "$ssl")"
row "AES-XTS decrypt MB/s (vs openssl)" "$dec" "$ssl" "$(ratio "$dec" "$ssl")"
fi

# ---- opening a volume with 10 000 wrapped data keys ----------------------
if want open; then
log "open: 10 000 data keys, principal key in a KMIP server (dev server, loopback)"
openb=$(go test ./volume -run '^$' -bench 'Open10kKeys' -benchtime 3x 2>/dev/null | awk '/s\/open/ { for (i = 1; i <= NF; i++) if ($(i+1) == "s/open") print $1, $i }')
ol=$(awk '/local/ { printf "%.3f", $2 }' <<<"$openb")
os_=$(awk '/server/ { printf "%.3f", $2 }' <<<"$openb")
row "open 10k keys, wrap=local (s, goal)" "$ol" "1.000" "$(ratio "$ol" 1)"
row "open 10k keys, wrap=server (s)" "$os_" "-" "-"
fi

# ---- servers --------------------------------------------------------------
# The start functions set SOCK (not a subshell: pids must reach cleanup).
start_tdeshim() { # $1 = name, then extra serve arguments; VOL_SIZE (2G)
  local vol=$WORK/$1.vol
  SOCK=$WORK/$1-tdeshim.sock
  "$BIN" init --volume "$vol" --size "${VOL_SIZE:-2G}" --key-file "$WORK/$1.key" >/dev/null 2>&1
  "$BIN" serve --volume "$vol" --listen "unix:$SOCK" --log-level warn --control-dir "$WORK/ctl" "${@:2}" >"$WORK/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "tdeshim serve did not start:" >&2; cat "$WORK/$1.log" >&2; exit 1
}
start_nbdkit() { # $1 = name
  local f=$WORK/$1.raw
  SOCK=$WORK/$1-nbdkit.sock
  truncate -s "${VOL_SIZE:-2G}" "$f"
  # nbdkit daemonizes with -P; Debian's stops serving if its parent dies
  # otherwise.
  nbdkit -U "$SOCK" -P "$WORK/$1.pid" file file="$f" </dev/null >/dev/null 2>&1
  for _ in $(seq 200); do [[ -s $WORK/$1.pid ]] && break; sleep 0.05; done
  pids+=("$(cat "$WORK/$1.pid")")
  for _ in $(seq 200); do nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "nbdkit did not start" >&2; exit 1
}
stop_last() {
  local p=${pids[-1]}
  kill "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  unset 'pids[-1]'
}

secs() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }'; }
median3() { tr ' ' '\n' <<<"$*" | sort -n | sed -n 2p; }

if want copy; then
log "nbdcopy: $COPY_SIZE write+flush and read"
src=$WORK/random.bin
head -c "$COPY_SIZE" /dev/urandom >"$src"
bytes=$(stat -c %s "$src")
copy_bench() { # $1 = socket; prints "writeMBs readMBs"
  local uri="nbd+unix:///?socket=$1" w=() r=()
  for i in 1 2 3; do
    w+=("$(secs nbdcopy --flush "$src" "$uri")")
    r+=("$(secs nbdcopy "$uri" null:)")
  done
  awk -v b="$bytes" -v w="$(median3 "${w[*]}")" -v r="$(median3 "${r[*]}")" 'BEGIN { printf "%.0f %.0f\n", b / w / 1e6, b / r / 1e6 }'
}
start_tdeshim copy; read -r tw tr_ < <(copy_bench "$SOCK"); stop_last
start_nbdkit copy;  read -r kw kr < <(copy_bench "$SOCK"); stop_last
row "nbdcopy write MB/s (vs nbdkit)" "$tw" "$kw" "$(ratio "$tw" "$kw")"
row "nbdcopy read MB/s (vs nbdkit)" "$tr_" "$kr" "$(ratio "$tr_" "$kr")"
fi

# ---- fio over nbdfuse + loop + ext4 ----------------------------------------
fio_bench() { # $1 = socket, $2 = name; writes 4 IOPS figures to $WORK/fio.out
  local dev mnt=$WORK/$2.mnt
  dev=$("$BIN" attach --socket "$1" --via fuse-loop --mount-dir "$WORK/$2.fuse" </dev/null)
  devs+=("$dev")
  mkfs.ext4 -q -F -b 4096 "$dev"
  mkdir -p "$mnt"; mount -o nodelalloc,discard "$dev" "$mnt"; mnts+=("$mnt")
  local out=()
  for rw in randread randwrite; do
    for qd in 1 16; do
      out+=("$(fio --name=b --filename="$mnt/fio.dat" --size=512M --rw=$rw --bs=4k --iodepth=$qd \
        --ioengine=libaio --direct=1 --time_based --runtime="$FIO_TIME" --ramp_time=2 \
        --output-format=json 2>/dev/null | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))')")
    done
  done
  umount "$mnt"; unset 'mnts[-1]'
  "$BIN" detach "$dev"; unset 'devs[-1]'
  echo "${out[*]}" >"$WORK/fio.out"
}
if want fio; then
log "fio 4k random, iodepth 1/16, ${FIO_TIME}s each, ext4 over nbdfuse+loop"
start_tdeshim fio; fio_bench "$SOCK" tdeshim; read -r t1 t2 t3 t4 <"$WORK/fio.out"; stop_last
start_nbdkit fio;  fio_bench "$SOCK" nbdkit;  read -r k1 k2 k3 k4 <"$WORK/fio.out"; stop_last
row "fio randread qd1 IOPS (vs nbdkit)" "$t1" "$k1" "$(ratio "$t1" "$k1")"
row "fio randread qd16 IOPS (vs nbdkit)" "$t2" "$k2" "$(ratio "$t2" "$k2")"
row "fio randwrite qd1 IOPS (vs nbdkit)" "$t3" "$k3" "$(ratio "$t3" "$k3")"
row "fio randwrite qd16 IOPS (vs nbdkit)" "$t4" "$k4" "$(ratio "$t4" "$k4")"
fi

# ---- pgbench: ext4 over nbdkit (anchor), over tdeshim, and plain disk ----
PG_SCALE=${PG_SCALE:-20}
PG_TIME=${PG_TIME:-60}
[[ -n ${BENCH_QUICK:-} ]] && { PG_SCALE=5; PG_TIME=10; }
PGBIN=/usr/lib/postgresql/15/bin
pg_port=56900
pgb_run() { # $1 = mount dir; writes "rwTPS rwP99 roTPS roP99" to $WORK/pg.out
  local mnt=$1 data=$1/pgdata sock=$1/sock
  pg_port=$((pg_port + 1))
  mkdir -p "$sock"; chown postgres: "$mnt" "$sock"
  runuser -u postgres -- "$PGBIN/initdb" -D "$data" -U postgres --auth=trust >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$data" -w -l "$1/pg.log" -o "-p $pg_port -k $sock -c listen_addresses='' -c shared_buffers=128MB" start >/dev/null
  local pgb=(runuser -u postgres -- pgbench -h "$sock" -p "$pg_port" -U postgres)
  "${pgb[@]}" -i -q -s "$PG_SCALE" postgres >/dev/null 2>&1
  if [[ -n ${PGB_HOOK:-} ]]; then "$PGB_HOOK" before; fi
  local res=()
  for mode in rw ro; do
    local extra=() logdir=$WORK/pglog-$mode
    [[ $mode == ro ]] && extra=(-S)
    rm -rf "$logdir"; mkdir -p "$logdir"; chown postgres: "$logdir"
    local out
    out=$(cd "$logdir" && "${pgb[@]}" -c 2 -j 2 -T "$PG_TIME" -l --sampling-rate=0.2 "${extra[@]}" postgres 2>&1)
    res+=("$(awk '/^tps = / { printf "%.0f", $3 }' <<<"$out")")
    res+=("$(cat "$logdir"/pgbench_log.* | awk '{ print $3 }' | sort -n | awk '{ a[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.2f", a[i] / 1000 }')")
    if [[ -n ${PGB_HOOK:-} && $mode == rw ]]; then "$PGB_HOOK" after-rw; fi
  done
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  echo "${res[*]}" >"$WORK/pg.out"
}
pg_on_socket() { # $1 = socket, $2 = name
  local dev mnt=$WORK/$2.pgmnt
  dev=$("$BIN" attach --socket "$1" --via fuse-loop --mount-dir "$WORK/$2.pgfuse" </dev/null)
  devs+=("$dev")
  mkfs.ext4 -q -F -b 4096 "$dev"
  mkdir -p "$mnt"; mount -o nodelalloc,discard "$dev" "$mnt"; mnts+=("$mnt")
  pgb_run "$mnt"
  umount "$mnt"; unset 'mnts[-1]'
  "$BIN" detach "$dev"; unset 'devs[-1]'
}
# rel_hook measures the rekeyer over the read-write run only: it waits
# for the bulk load's rekeying to settle, zeroes the counters, and after
# the run (plus a few seconds for the lag) reads them back.
rel_status() { "$BIN" status --volume "$WORK/pgrel.vol" --control-dir "$WORK/ctl" "$@"; }
rel_hook() {
  case $1 in
  before)
    sync
    for _ in $(seq 120); do
      rel_status --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["live"]["rekey"]; sys.exit(0 if r["pending_blocks"] == 0 and r["retiring_slots"] == 0 else 1)' && break
      sleep 1
    done
    rel_status --reset-rekey-stats >/dev/null ;;
  after-rw)
    sync; sleep 5
    rel_status --relations --json >"$WORK/rel-status.json" ;;
  esac
}
if want pg && [[ -x $PGBIN/initdb ]]; then
  log "pgbench scale $PG_SCALE, 2 clients, ${PG_TIME}s, read-write and -S; 10 GiB volumes"
  export VOL_SIZE=10G
  start_nbdkit pg;  pg_on_socket "$SOCK" nbdkit;  read -r krw krw99 kro kro99 <"$WORK/pg.out"; stop_last
  start_tdeshim pg; pg_on_socket "$SOCK" tdeshim; read -r trw trw99 tro tro99 <"$WORK/pg.out"; stop_last
  start_tdeshim pgrel --watch "$WORK/tdeshim-rel.pgmnt"
  PGB_HOOK=rel_hook pg_on_socket "$SOCK" tdeshim-rel; read -r rrw rrw99 rro rro99 <"$WORK/pg.out"; stop_last
  mkdir -p "$WORK/plain"; pgb_run "$WORK/plain"; read -r prw prw99 pro pro99 <"$WORK/pg.out"
  unset VOL_SIZE
  row "pgbench rw TPS (vs nbdkit)" "$trw" "$krw" "$(ratio "$trw" "$krw")"
  row "pgbench rw p99 ms (vs nbdkit)" "$trw99" "$krw99" "$(ratio "$trw99" "$krw99")"
  row "pgbench -S TPS (vs nbdkit)" "$tro" "$kro" "$(ratio "$tro" "$kro")"
  row "pgbench -S p99 ms (vs nbdkit)" "$tro99" "$kro99" "$(ratio "$tro99" "$kro99")"
  row "pgbench rw TPS, plain disk" "$prw" "-" "-"
  row "pgbench -S TPS, plain disk" "$pro" "-" "-"
  row "per-relation keys: rw TPS (vs volume key)" "$rrw" "$trw" "$(ratio "$rrw" "$trw")"
  row "per-relation keys: rw p99 ms (vs vol key)" "$rrw99" "$trw99" "$(ratio "$rrw99" "$trw99")"
  row "per-relation keys: -S TPS (vs volume key)" "$rro" "$tro" "$(ratio "$rro" "$tro")"
  read -r amp lag99 moved relkeys kmb ixb < <(python3 - "$WORK/rel-status.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r, k = s["live"]["rekey"], s["keys"]
print("%.2f %.2f %d %d %.1f %.2f" % (100 * r["amplification"], r["lag_p99_seconds"], r["moved_blocks"], len(s["relations"]),
      k["key_map_bytes"] * 1024 / 10 / 2**20, k["index_bytes"] * 1024 / 10 / 2**20))
PY
)
  row "rekey amplification % (goal <= 5)" "$amp" "5" "$(ratio "$amp" 5)"
  row "rekey lag p99 s (goal <= 5)" "$lag99" "5" "$(ratio "$lag99" 5)"
  row "blocks rekeyed during pgbench rw" "$moved" "-" "-"
  row "relation keys in use" "$relkeys" "-" "-"
  row "key map MiB per TiB (10 GiB measured)" "$kmb" "-" "-"
  row "block index MiB per TiB (goal <= 64)" "$ixb" "64" "$(ratio "$ixb" 64)"
fi

echo
echo "machine: $(nproc) cores, $(uname -r), $(date -u +%FT%TZ)" | tee -a "$RES"
echo "results in $RES"
