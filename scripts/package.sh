#!/usr/bin/env bash
# Builds the Debian package of Portico from binaries already built: stages the file tree and
# calls `dpkg-deb --build` (no packaging tool beyond dpkg).
#
#   scripts/package.sh [--bin-dir DIR] [--version VERSION] [--config FILE] [--out DIR]
#
#   --bin-dir  where `portico` and `portico-dataplane` are (default target/release; build
#              them first: cargo build --release --workspace)
#   --version  package version (default: the workspace version)
#   --config   the configuration shipped as /etc/portico/portico.toml (default: made from
#              portico.example.toml with state_dir = "/var/lib/portico")
#   --out      directory of the .deb (default target/debian)
#   --compress xz (default), gzip or none (quick, for tests of debug builds)
#
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

BIN_DIR="$ROOT/target/release"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
CONFIG=""
OUT="$ROOT/target/debian"
COMPRESS=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN_DIR=$2; shift 2 ;;
        --version) VERSION=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --compress) COMPRESS=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for b in portico portico-dataplane; do
    if [ ! -x "$BIN_DIR/$b" ]; then
        echo "package.sh: $BIN_DIR/$b is missing; build it first (cargo build --release --workspace)" >&2
        exit 1
    fi
done
ARCH=$(dpkg --print-architecture)
mkdir -p "$OUT"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/portico-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
chmod 0755 "$STAGE"

install -d "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/etc/portico" "$STAGE/lib/systemd/system" \
    "$STAGE/usr/share/portico/grafana" "$STAGE/usr/share/doc/portico"
install -m 0755 "$BIN_DIR/portico" "$BIN_DIR/portico-dataplane" "$STAGE/usr/bin/"
if [ -n "$CONFIG" ]; then
    install -m 0640 "$CONFIG" "$STAGE/etc/portico/portico.toml"
else
    # The example, with the packaged state dir and without the example TURN user.
    sed -e 's|^state_dir = .*|state_dir = "/var/lib/portico"|' \
        -e 's|^  { name = "alice", password = "change-me" },|  # { name = "alice", password = "change-me" },|' \
        portico.example.toml > "$STAGE/etc/portico/portico.toml"
    chmod 0640 "$STAGE/etc/portico/portico.toml"
    grep -q '^state_dir = "/var/lib/portico"$' "$STAGE/etc/portico/portico.toml"
    "$BIN_DIR/portico" check "$STAGE/etc/portico/portico.toml" >/dev/null
fi
install -m 0644 packaging/portico.service "$STAGE/lib/systemd/system/portico.service"
install -m 0644 packaging/grafana/portico-dashboard.json "$STAGE/usr/share/portico/grafana/"
install -m 0644 README.md "$STAGE/usr/share/doc/portico/README.md"
install -m 0644 portico.example.toml "$STAGE/usr/share/doc/portico/portico.example.toml"
printf 'Portico\nLicense: Apache-2.0\nOn Debian systems the license is in /usr/share/common-licenses/Apache-2.0.\n' \
    > "$STAGE/usr/share/doc/portico/copyright"
install -m 0644 packaging/debian/conffiles "$STAGE/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$STAGE/DEBIAN/"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@SIZE@|$SIZE|" \
    packaging/debian/control.in > "$STAGE/DEBIAN/control"

DEB="$OUT/portico_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group "-Z$COMPRESS" --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
