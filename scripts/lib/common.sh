# Shared helpers for the project's scripts. Source it; do not run it.

# repo root
ZL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ensure_packages PKG...: installs the Debian packages that are missing.
# Needs root (or sudo); says what to run otherwise.
ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "missing packages: ${missing[*]}; install them as root: apt-get install -y ${missing[*]}"
        sudo=(sudo)
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Debian packages the test suite uses.
TEST_PACKAGES=(ca-certificates file nftables iproute2 iputils-ping curl
    qemu-system-x86 busybox-static cpio gzip kmod git)
# Images with a root disk (devbox): mmdebstrap builds the Debian tree,
# mke2fs -d (e2fsprogs) makes it an ext4 image without mounting.
TEST_PACKAGES+=(mmdebstrap e2fsprogs)

# qemu-img must come from the same QEMU as qemu-system-x86: on machines with
# a newer qemu-utils from elsewhere, installing qemu-system-x86 removes it,
# so it is checked (and installed from Debian) after the rest.
LATE_TEST_PACKAGES=(qemu-utils)
