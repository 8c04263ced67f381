#!/usr/bin/env bash
# build-base.sh - the images' base for machines that reach no container registry: Python 3.11
# and its runtime libraries from Debian 12's packages, unpacked (no dpkg, apt, shell, compiler or
# package manager inside), imported into podman as localhost/ibutsu-python-base:3.11-debian12.
# About 45 MB uncompressed. Where a registry is reachable, build the role images on a public
# base instead (BASE_IMAGE build argument, see images/README.md).
#
# Usage: images/base/build-base.sh [IMAGE]   (needs root, podman and apt-get download)
set -euo pipefail

IMAGE="${1:-localhost/ibutsu-python-base:3.11-debian12}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/../containers.conf}"
# Exactly what python3.11 and the wheels in the role PEXes load at run time; psycopg2-binary
# brings its own libpq and OpenSSL.
# Interactive and legacy modules (readline, curses, dbm, nis) are left without their libraries.
PACKAGES=(libc6 libgcc-s1 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal libssl3
  zlib1g libexpat1 libffi8 libsqlite3-0 liblzma5 libbz2-1.0 libuuid1 libcrypt1
  ca-certificates netbase tzdata media-types)

log() { echo "[base] $*" >&2; }
command -v podman >/dev/null || { log "podman is missing: apt-get install podman runc"; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/rootfs"
log "downloading ${#PACKAGES[@]} Debian packages"
(cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root "${PACKAGES[@]}" >/dev/null)
for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$WORK/rootfs"; done

cd "$WORK/rootfs"
# Documentation, locales, the test suite, GUI and dev modules, and every program but python: no
# shell, no package manager, no compiler.
rm -rf usr/share/{doc,man,lintian,locale,info,i18n,bug,debconf,menu,pixmaps,applications} \
  usr/share/zoneinfo/{right,posix} usr/lib/x86_64-linux-gnu/gconv usr/sbin sbin etc/init.d \
  usr/lib/python3.11/{test,idlelib,tkinter,lib2to3,pydoc_data,turtledemo,ensurepip,distutils/command/*.exe} \
  usr/lib/python3*/dist-packages usr/share/python3* var/lib/dpkg
find usr/bin -mindepth 1 ! -name python3.11 -delete
ln -s python3.11 usr/bin/python3
ln -s usr/bin bin
mkdir -p etc/ssl/certs tmp app && chmod 1777 tmp
# Mozilla's roots only (what ca-certificates ships), never the build machine's own bundle.
cat usr/share/ca-certificates/mozilla/*.crt > etc/ssl/certs/ca-certificates.crt
rm -rf usr/share/ca-certificates etc/ca-certificates*
ln -sf /usr/share/zoneinfo/Etc/UTC etc/localtime
echo "Etc/UTC" > etc/timezone
# PEX probes for musl with `ldd`; a stub keeps it quiet without shipping glibc's shell script.
printf '#!/usr/bin/python3.11\nraise SystemExit(0)\n' > usr/bin/ldd && chmod 755 usr/bin/ldd
# The images run as UID 10001 or any UID OpenShift picks, always with group 0.
printf 'root:x:0:0:root:/root:/sbin/nologin\nibutsu:x:10001:0:ibutsu:/tmp:/sbin/nologin\n' > etc/passwd
printf 'root:x:0:\n' > etc/group
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > etc/nsswitch.conf
# The standard library as sourceless bytecode, compiled once here: a read-only root filesystem
# cannot cache bytecode, and source beside it would add 9 MB (tracebacks through the standard
# library keep file, line and function, without the source line).
rm -rf usr/lib/python3.11/{curses,sqlite3/test,unittest/test}
chroot . /usr/bin/python3.11 -m compileall -q -j1 -b --invalidation-mode unchecked-hash \
  /usr/lib/python3.11 >/dev/null
find usr/lib/python3.11 -name '*.py' -delete
tar --numeric-owner --owner=0 --group=0 -C "$WORK/rootfs" -cf "$WORK/base.tar" .

log "importing $IMAGE"
podman import -q \
  --change 'ENV PATH=/usr/bin LANG=C.UTF-8 HOME=/tmp' \
  --change 'USER 10001:0' --change 'WORKDIR /tmp' \
  --change 'ENTRYPOINT ["/usr/bin/python3.11"]' \
  "$WORK/base.tar" "$IMAGE" >/dev/null
log "$IMAGE: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}')"
