#!/usr/bin/env bash
# Installs what building, testing, benchmarking and the demo need on a
# fresh Debian 12 machine: Debian packages (only those missing) and the Go
# modules of go.sum. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# cgo OpenSSL engine; real NBD clients and the reference server; loop,
# FUSE and ext4; benchmarks; PostgreSQL 15; an independent KMIP server.
packages=(
  gcc libssl-dev openssl
  libnbd-bin python3-libnbd nbdkit qemu-utils
  fuse3 util-linux e2fsprogs
  fio
  postgresql postgresql-contrib
  python3-pykmip
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a default cluster on install; tdeshim runs its own.
if systemctl is-active --quiet postgresql 2>/dev/null; then systemctl stop postgresql || true; fi
go mod download
(cd e2e/containers && go mod download)
