#!/bin/sh
# /init of the cryptfs VM rig. Stands in for OE's initramfs-framework around the project's own
# module (units/initramfs-framework/cryptfs, sourced unchanged), mounts the root from the mapping
# it hands over, then runs the userspace stage exactly as the unit's ExecStart= while a workload
# writes and re-reads files on the mounted root. Reports on the serial console as
# "CRYPTFS-VM: ..." lines for the host.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /rootfs /boot
mount -t tmpfs tmpfs /run
# e2fsprogs finds mounted filesystems (resize2fs grows the mounted root online) through mtab.
ln -sf /proc/mounts /etc/mtab
# No udev here: libdevmapper creates the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1
export TPM2TOOLS_TCTI=device:/dev/tpmrm0

mark() { echo "CRYPTFS-VM: $*"; }
finish() {
	cd /
	umount /rootfs 2>/dev/null
	umount /boot 2>/dev/null
	sync
	# Flush requests the guest's block layer completed on the disk (field 16 of the stat
	# file): the write-log rig compares them with the flushes that reached the host.
	set -- $(cat /sys/block/vda/stat)
	mark "vda-flushes ${16:-unknown}"
	mark "end"
	poweroff -f
}
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }

for m in virtio_pci virtio_blk dm_mod dm_crypt xts aesni_intel; do
	modprobe "$m" || mark "modprobe $m failed"
done
i=0
while [ ! -b /dev/vda2 ] && [ "$i" -lt 100 ]; do
	sleep 0.1
	i=$((i + 1))
done
boot_no=$(arg cryptfs.vm.boot)
# libcryptsetup's own debug log on the console, when a test asks for it.
[ "$(arg cryptfs.vm.debug)" = 1 ] && export CRYPTFS_CRYPTSETUP_DEBUG=1
cp "/etc/cryptfs/$(arg cryptfs.vm.config).toml" /etc/cryptfs/cryptfs.toml
if [ "$(arg cryptfs.vm.extend_pcr7)" = 1 ]; then
	# What a firmware or secure-boot database update does to PCR 7.
	tpm2_pcrextend "7:sha256=$(printf '%064d' 7)" && mark "pcr7-extended"
fi

# initramfs-framework's environment for modules.
ROOTFS_DIR=/rootfs
msg() { echo "$@"; }
fatal() {
	echo "$@"
	mark "fatal $*"
	finish
}
. /init.d/85-cryptfs
cryptfs_enabled || fatal "cryptfs module not enabled"
cryptfs_run
# What the framework's rootfs module does with the handed-over root.
mount -t ext4 "$bootparam_root" "$ROOTFS_DIR" || fatal "cannot mount $bootparam_root"
mark "mounted uptime=$(cut -d' ' -f1 /proc/uptime)"
# The module unmounts the boot partition it mounted; the real system mounts it again from
# fstab (the unit's RequiresMountsFor=), and so does the rig.
grep -q " /boot " /proc/mounts && mark "boot-left-mounted"
mount "$(findfs LABEL=boot)" /boot || fatal "cannot mount the boot partition"
/usr/bin/cryptfs status --config /etc/cryptfs/cryptfs.toml

cd "$ROOTFS_DIR/data" || fatal "no /data on the root filesystem"
check() {
	echo 3 >/proc/sys/vm/drop_caches
	b3sum -c --quiet before.b3 || return 1
	if [ -f during.b3 ]; then b3sum -c --quiet during.b3 || return 1; fi
	return 0
}
mark "fs-kib-at-mount $(df -k "$ROOTFS_DIR" | sed -n '2p' | tr -s ' ' | cut -d' ' -f2)"
check && mark "files-ok-at-mount $(cat during.b3 2>/dev/null | wc -l)" || mark "files-bad-at-mount"

# The userspace stage: the unit's ExecStart=, in the background like Type=exec.
@EXECSTART@ &
service=$!
started=$(cut -d. -f1 /proc/uptime)
# Optionally stop it like `systemctl stop`/a restart does (SIGTERM to the main process) after
# some seconds, then start it again as Restart= would: it must pick up where it stopped.
restart_after=$(arg cryptfs.vm.restart_after)
n=0
bad=0
while kill -0 "$service" 2>/dev/null; do
	n=$((n + 1))
	f="during-$boot_no-$n.bin"
	dd if=/dev/urandom of="$f" bs=64k count=4 2>/dev/null
	sync
	b3sum "$f" >>during.b3
	sync
	check || bad=$((bad + 1))
	now=$(cut -d. -f1 /proc/uptime)
	if [ -n "$restart_after" ] && [ $((now - started)) -ge "$restart_after" ]; then
		restart_after=""
		kill -TERM "$service"
		wait "$service"
		mark "service-stopped rc=$? after $((now - started)) s"
		@EXECSTART@ &
		service=$!
	fi
done
wait "$service"
rc=$?
mark "userspace-exit $rc written=$n bad-reads=$bad"
check && mark "files-ok $(wc -l <during.b3)" || mark "files-bad"
state=$(/usr/bin/cryptfs status --config /etc/cryptfs/cryptfs.toml --json | sed -n 's/^  "state": "\(.*\)",$/\1/p')
mark "state $state"
mark "fs-kib $(df -k "$ROOTFS_DIR" | sed -n '2p' | tr -s ' ' | cut -d' ' -f2)"
finish
