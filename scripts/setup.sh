#!/usr/bin/env bash
# Installs what Ferry needs on a fresh Debian bookworm machine, and refuses a
# QEMU that would corrupt migrating guests.
#
# QEMU must be 10.0 from bookworm-backports: with bookworm's 7.2 under TCG, a
# guest that dirties memory during a pre-copy migration crashed on the
# destination in every run we measured (stale memory); 10.0 passes the same
# runs. Installing bookworm's qemu-system-x86 would also remove the machine's
# qemu-utils 10.0 from backports.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: installing packages needs root (run as root or with sudo)" >&2
    exit 1
  fi
}

backports_list=/etc/apt/sources.list.d/ferry-bookworm-backports.sources
apt_updated=0
apt_update() {
  if [ "$apt_updated" -eq 0 ]; then
    echo "setup: apt-get update" >&2
    apt-get update -q >/dev/null
    apt_updated=1
  fi
}

ensure_backports() {
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return
  fi
  need_root
  echo "setup: adding the bookworm-backports suite ($backports_list)" >&2
  cat >"$backports_list" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt_updated=0
}

# Debian packages that must be present (command → package).
missing=()
check_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
check_cmd ip iproute2
# The import/export test validates exported libvirt XML against libvirt's schemas.
check_cmd virt-xml-validate libvirt-clients
check_cmd xmllint libxml2-utils   # virt-xml-validate runs it

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local version
  version=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  set -- $version
  [ "${1:-0}" -ge 10 ]
}

if ! qemu_ok || ! command -v qemu-img >/dev/null 2>&1; then
  need_root
  ensure_backports
  apt_update
  echo "setup: installing QEMU 10 from bookworm-backports" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports \
    --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
fi
if ! qemu_ok; then
  echo "setup: qemu-system-x86_64 is $(qemu-system-x86_64 --version 2>/dev/null | head -1 || echo missing);" >&2
  echo "       Ferry needs QEMU >= 10.0 (bookworm-backports): 7.2 corrupts migrating guests under TCG." >&2
  exit 1
fi

if [ "${#missing[@]}" -gt 0 ]; then
  need_root
  apt_update
  echo "setup: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
echo "setup: $(qemu-system-x86_64 --version | head -1); $(cargo --version)" >&2
