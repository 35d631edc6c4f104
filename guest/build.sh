#!/bin/bash
# Builds Ferry's test guest from Debian packages into target/test-guest/ (relative to the
# repository root, whatever the current directory):
#
#   vmlinuz        Debian's cloud kernel (linux-image-cloud-amd64's current dependency)
#   initramfs.img  busybox-static + guest/init + the static ferry-probe + virtio modules
#   disk.raw       BIOS-bootable raw disk: p1 FAT (syslinux, kernel, initramfs,
#                  syslinux.cfg), p2 a raw area for the disk oracle
#   cmdline        the kernel command line disk.raw boots with
#
# Cached: nothing is rebuilt while the stamp (a hash of this script, guest/init, the probe
# sources, the toolchain and the package versions) matches. Run as root on Debian bookworm;
# missing packages are installed with apt-get. See guest/README.md.
set -euo pipefail

die() {
    echo "guest/build.sh: error: $*" >&2
    exit 1
}
log() { echo "guest/build.sh: $*" >&2; }

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$GUEST_DIR/.." && pwd)
OUT=$ROOT/target/test-guest
CACHE=$OUT/cache
WORK=$OUT/work

KERNEL_META=linux-image-cloud-amd64
# Load order matters: busybox insmod does not resolve dependencies. Each module's
# `depends=` is checked against this order below.
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk virtio_console
    failover net_failover virtio_net
    button evdev # ACPI power button -> /dev/input/event*, watched by the probe
)
# ferry.disk_optional=1: booted on a SATA or SCSI bus (an import from VirtualBox or
# Hyper-V), the disk has no /dev/vda2; the probe then beats without the disk oracle.
# disk.raw is meant for a 512 MiB guest: mem=448M keeps the kernel out of 448M..512M, the
# probe's working set is 32 MiB at 448M (the top of RAM holds firmware tables).
DISK_CMDLINE="console=ttyS0 quiet mem=448M ferry.mem_base=448M ferry.mem_mib=32 ferry.mem_rate=8 ferry.hb_ms=10 ferry.disk=/dev/vda2 ferry.disk_optional=1 ferry.disk_rate=50"
# Disk layout, in 512-byte sectors: p1 FAT at 1 MiB (63 MiB), p2 oracle area at 64 MiB
# (64 MiB). Total 128 MiB.
SECTOR=512
P1_START=2048
P1_SECTORS=129024
P2_START=131072
P2_SECTORS=131072
DISK_SECTORS=$((P2_START + P2_SECTORS))
PACKAGES=(busybox-static cpio syslinux syslinux-common mtools dosfstools fdisk file gzip)

# --- tools -------------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    [ "$(id -u)" = 0 ] || die "need root to run apt-get update (or install the packages yourself)"
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed; are Debian's package mirrors reachable?"
    APT_UPDATED=1
}

ensure_packages() {
    local missing=() p
    for p in "$@"; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
    apt_update_once
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        die "could not install ${missing[*]} with apt-get"
}

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    die "this script needs a Debian system (dpkg, apt)"
fi
ensure_packages "${PACKAGES[@]}"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) to build the probe"

BUSYBOX=/bin/busybox
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing although busybox-static is installed"
[ -f "$SYSLINUX_MBR" ] || die "$SYSLINUX_MBR missing although syslinux-common is installed"
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static (is busybox-static installed, not busybox?)"

# --- resolve the kernel package ------------------------------------------------------------
# linux-image-cloud-amd64 is a metapackage; download only the package its candidate
# version depends on (a glob would fetch every version in the archive).
resolve_kernel() {
    local meta_ver
    meta_ver=$(apt-cache policy "$KERNEL_META" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
    [ -n "$meta_ver" ] && [ "$meta_ver" != "(none)" ] || return 1
    KPKG=$(apt-cache depends "$KERNEL_META=$meta_ver" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    [ -n "$KPKG" ] || return 1
    KVER=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null | awk '$1 == "Version:" { print $2; exit }')
    [ -n "$KVER" ]
}
if ! resolve_kernel; then
    apt_update_once
    resolve_kernel || die "cannot resolve $KERNEL_META with apt-cache; is the bookworm (or bookworm-security) suite in apt's sources?"
fi

# --- cache check ---------------------------------------------------------------------------
pkg_version() { dpkg-query -W -f='${Version}' "$1"; }
stamp_inputs() {
    echo "kernel $KPKG $KVER"
    for p in busybox-static syslinux syslinux-common mtools dosfstools; do echo "$p $(pkg_version "$p")"; done
    rustc -V 2>/dev/null || echo "rustc unknown"
    sha256sum "$GUEST_DIR/build.sh" "$GUEST_DIR/init"
    (cd "$ROOT" && find guest/probe -type f -not -path '*/target/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
}

mkdir -p "$OUT" "$CACHE"
# Serialise concurrent builds (e.g. two test binaries racing to build the guest).
exec 9>"$OUT/.lock"
flock 9

STAMP=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ] && [ -f "$OUT/disk.raw" ]; then
    log "up to date ($OUT)"
    exit 0
fi
rm -f "$OUT/stamp"

# --- probe ---------------------------------------------------------------------------------
# Static via glibc's crt-static (no musl target here). The explicit --target keeps
# RUSTFLAGS from applying to build scripts and proc macros of other crates.
log "building ferry-probe (static)"
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    cargo build --quiet --release -p ferry-probe --target x86_64-unknown-linux-gnu --target-dir target/probe-build) ||
    die "cargo build of ferry-probe failed"
PROBE=$ROOT/target/probe-build/x86_64-unknown-linux-gnu/release/ferry-probe
file -L "$PROBE" | grep -Eq 'statically linked|static-pie linked' || die "$PROBE is not static: $(file -L "$PROBE")"
if ldd "$PROBE" >/dev/null 2>&1 && ! ldd "$PROBE" 2>&1 | grep -Eq 'not a dynamic executable|statically linked'; then
    die "$PROBE has dynamic dependencies: $(ldd "$PROBE" 2>&1)"
fi

# --- kernel --------------------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK"
DEB=$(find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | head -n1)
if [ -z "$DEB" ] || [ "$(dpkg-deb -f "$DEB" Version)" != "$KVER" ]; then
    rm -f "$CACHE"/linux-image-*.deb
    log "downloading $KPKG=$KVER"
    # Root's download must not be handed to the _apt sandbox user (it cannot write here).
    (cd "$CACHE" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG=$KVER" >&2) ||
        die "apt-get download $KPKG=$KVER failed"
    DEB=$(find "$CACHE" -maxdepth 1 -name "${KPKG}_*.deb" | head -n1)
    [ -n "$DEB" ] || die "apt-get download left no ${KPKG}_*.deb in $CACHE"
fi
dpkg-deb -x "$DEB" "$WORK/kernel"
VMLINUZ=$(find "$WORK/kernel/boot" -name 'vmlinuz-*' | head -n1)
[ -n "$VMLINUZ" ] || die "no vmlinuz in $DEB"
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR=$WORK/kernel/lib/modules/$KREL
[ -d "$MODDIR" ] || die "no modules directory for $KREL in $DEB"

# --- initramfs -----------------------------------------------------------------------------
STAGE=$WORK/initramfs
mkdir -p "$STAGE"/{bin,dev,proc,sys,etc,lib/modules}
cp "$BUSYBOX" "$STAGE/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$STAGE/bin/$applet"
done
cp "$PROBE" "$STAGE/bin/ferry-probe"
install -m 0755 "$GUEST_DIR/init" "$STAGE/init"

loaded=" "
for m in "${MODULES[@]}"; do
    ko=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
    [ -n "$ko" ] || die "module $m not found in $KPKG (built in? then drop it from MODULES)"
    dst=$STAGE/lib/modules/$m.ko
    # busybox insmod only takes plain ELF objects, so decompress here if Debian ever
    # starts compressing modules (6.1 ships them uncompressed).
    case "$ko" in
    *.ko) cp "$ko" "$dst" ;;
    *.xz) ensure_packages xz-utils && xz -dc "$ko" >"$dst" ;;
    *.zst) ensure_packages zstd && zstd -qdc "$ko" >"$dst" ;;
    *.gz) gzip -dc "$ko" >"$dst" ;;
    esac
    # The .modinfo strings are NUL-separated; no need for kmod's modinfo.
    vermagic=$(tr '\0' '\n' <"$dst" | sed -n 's/^vermagic=//p' | head -n1)
    [ "${vermagic%% *}" = "$KREL" ] || die "module $m is for '${vermagic%% *}', kernel is $KREL"
    deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do
        case "$loaded" in
        *" $d "*) ;;
        *) die "module $m depends on $d, which MODULES does not load before it" ;;
        esac
    done
    loaded="$loaded$m "
    echo "$m" >>"$STAGE/etc/modules"
done
# The kernel's built-in initramfs already provides /dev/console; this node only matters
# if a kernel without one is used.
[ "$(id -u)" = 0 ] && mknod -m 600 "$STAGE/dev/console" c 5 1
find "$STAGE" -exec touch -h -d @0 {} +
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null --quiet -o -H newc -R 0:0 --reproducible) |
    gzip -9n >"$WORK/initramfs.img"

# --- disk.raw ------------------------------------------------------------------------------
# No loop devices: sfdisk, mkfs.fat and syslinux all work on a plain file at an offset.
DISK=$WORK/disk.raw
truncate -s $((DISK_SECTORS * SECTOR)) "$DISK"
sfdisk --quiet "$DISK" <<EOF || die "sfdisk failed"
label: dos
label-id: 0x46455259
start=$P1_START, size=$P1_SECTORS, type=e, bootable
start=$P2_START, size=$P2_SECTORS, type=da
EOF
P1_OFFSET=$((P1_START * SECTOR))
# (mkfs.fat warns that the file is bigger than the file system: that is the point.)
mkfs_out=$(mkfs.fat -F 16 -n FERRYBOOT -i 46455259 -h "$P1_START" --offset "$P1_START" "$DISK" $((P1_SECTORS * SECTOR / 1024)) 2>&1) ||
    die "mkfs.fat failed: $mkfs_out"
cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT ferry
LABEL ferry
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $DISK_CMDLINE
EOF
export MTOOLS_SKIP_CHECK=1
mcopy -i "$DISK@@$P1_OFFSET" "$VMLINUZ" ::/vmlinuz || die "mcopy of the kernel failed (does it fit in p1?)"
mcopy -i "$DISK@@$P1_OFFSET" "$WORK/initramfs.img" ::/initrd.img || die "mcopy of the initramfs failed (does it fit in p1?)"
mcopy -i "$DISK@@$P1_OFFSET" "$WORK/syslinux.cfg" ::/syslinux.cfg || die "mcopy of syslinux.cfg failed"
syslinux --install --offset "$P1_OFFSET" "$DISK" || die "syslinux --install failed"
dd if="$SYSLINUX_MBR" of="$DISK" bs=440 count=1 conv=notrunc status=none
# The oracle area starts zeroed (the file is sparse): no stale records from any earlier
# image.

# --- publish -------------------------------------------------------------------------------
cp "$VMLINUZ" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$WORK/initramfs.img" "$OUT/initramfs.img"
mv "$DISK" "$OUT/disk.raw"
echo "$DISK_CMDLINE" >"$OUT/cmdline"
cat >"$OUT/manifest" <<EOF
kernel_package=$KPKG
kernel_version=$KVER
kernel_release=$KREL
modules=${MODULES[*]}
oracle_partition=2
oracle_offset=$((P2_START * SECTOR))
oracle_size=$((P2_SECTORS * SECTOR))
EOF
rm -rf "$WORK"
echo "$STAMP" >"$OUT/stamp"
log "built $OUT: kernel $KREL ($KPKG $KVER), initramfs $(du -h "$OUT/initramfs.img" | cut -f1), disk.raw $((DISK_SECTORS * SECTOR / 1048576)) MiB"
