#!/bin/sh
# Builds the initramfs for the `a_real_guest_says_hello` test: busybox as
# init, the Debian cloud kernel's virtio modules, and an init that writes a
# protocol `Hello` frame to the `org.zerolease.control` port.
#
#   hello-initrd.sh KERNEL_ROOT OUT.img
#
# KERNEL_ROOT is an unpacked linux-image-*-cloud-amd64 package
# (`dpkg -x linux-image-….deb KERNEL_ROOT`). Needs busybox-static and cpio.
# Then run:
#   ZEROLEASE_TEST_KERNEL=KERNEL_ROOT/boot/vmlinuz-… ZEROLEASE_TEST_INITRD=OUT.img \
#     cargo test -p zerolease --test vm a_real_guest
set -eu
root=$1
out=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/mods" "$work/dev" "$work/proc" "$work/sys"
cp /bin/busybox "$work/bin/busybox"
drivers=$(echo "$root"/lib/modules/*/kernel/drivers)
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
    virtio/virtio_pci_modern_dev virtio/virtio_pci char/virtio_console; do
    cp "$drivers/$m.ko" "$work/mods/"
done
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console; do
    $bb insmod /mods/$m.ko
done
i=0
while [ -z "$($bb ls /sys/class/virtio-ports 2>/dev/null)" ] && [ $i -lt 100 ]; do
    $bb sleep 0.1; i=$((i+1))
done
dev=
for p in /sys/class/virtio-ports/*; do
    [ "$($bb cat "$p/name")" = org.zerolease.control ] && dev=/dev/${p##*/}
done
msg='{"type":"hello","protocol_version":{"major":1,"minor":0},"agent_version":"initramfs-test"}'
# A frame: big-endian u32 length (< 256 here), then the JSON.
$bb printf "\\000\\000\\000\\$($bb printf %o ${#msg})%s" "$msg" > "$dev"
echo "zl-test: hello sent on $dev"
$bb sleep 600
$bb poweroff -f
INIT
chmod +x "$work/init"
(cd "$work" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out"
