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
# A firmware boot's arguments come over fw_cfg: its signed UKI's command line is fixed.
modprobe qemu_fw_cfg 2>/dev/null
fw_cfg=/sys/firmware/qemu_fw_cfg/by_name
args_file=/proc/cmdline
[ -f "$fw_cfg/opt/cryptfs/args/raw" ] && args_file=$fw_cfg/opt/cryptfs/args/raw
arg() { tr ' ' '\n' <"$args_file" | sed -n "s/^$1=//p"; }

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
if [ -d /sys/firmware/efi ]; then
	# A UEFI boot: what the firmware says about Secure Boot, and the PCR 7 it measured.
	# Mounted by the module's own function (cryptfs_run calls it again and finds it mounted).
	cryptfs_mount_efivarfs
	# The 4-byte attribute word, then the value (efivarfs files do not seek: read them whole).
	efivar() {
		# shellcheck disable=SC2046
		set -- $(od -An -tu1 "/sys/firmware/efi/efivars/$1-8be4df61-93ca-11d2-aa0d-00e098032b8c" 2>/dev/null)
		echo "$5"
	}
	mark "uefi secureboot=$(efivar SecureBoot) setupmode=$(efivar SetupMode) pcr7=$(cat /sys/class/tpm/tpm0/pcr-sha256/7)"
fi
cryptfs_enabled || fatal "cryptfs module not enabled"
# A rescue boot (cryptfs.vm.rescue=1): the module's path first; when it refuses, the recovery
# key the host hands over fw_cfg opens the volume and reseals it to this boot's PCRs.
rescue() {
	key=$fw_cfg/opt/cryptfs/recovery-key/raw
	[ -f "$key" ] || fatal "rescue boot without a recovery key"
	cryptfs_mount_boot || fatal "cannot mount the boot partition"
	/usr/bin/cryptfs status --config /etc/cryptfs/cryptfs.toml
	(umask 077 && cat "$key" >/run/recovery.key)
	bootparam_root=$(/usr/bin/cryptfs unlock --device-path --recovery-key-file /run/recovery.key --config /etc/cryptfs/cryptfs.toml) ||
		fatal "the recovery key did not open the volume"
	mark "unlocked-with-recovery-key"
	/usr/bin/cryptfs reseal --recovery-key-file /run/recovery.key --config /etc/cryptfs/cryptfs.toml ||
		fatal "reseal with the recovery key failed"
	mark "resealed"
	rm -f /run/recovery.key
	cryptfs_umount_boot
}
if [ "$(arg cryptfs.vm.rescue)" = 1 ]; then
	if (
		fatal() {
			echo "$@"
			mark "refused $*"
			exit 1
		}
		cryptfs_run && echo "$bootparam_root" >/run/root-dev
	); then
		bootparam_root=$(cat /run/root-dev)
	else
		rescue
	fi
else
	cryptfs_run
fi
# What the framework's rootfs module does with the handed-over root.
mount -t ext4 "$bootparam_root" "$ROOTFS_DIR" || fatal "cannot mount $bootparam_root"
mark "mounted uptime=$(cut -d' ' -f1 /proc/uptime)"
# The module unmounts the boot partition it mounted; the real system mounts it again from
# fstab (the unit's RequiresMountsFor=), and so does the rig.
grep -q " /boot " /proc/mounts && mark "boot-left-mounted"
if [ "$(arg cryptfs.vm.pid1)" = systemd ]; then
	# The systemd tier: the root's own systemd runs cryptfs.service (and the rig's driver).
	# The configuration this boot used goes with it; the kernel filesystems move along, as
	# initramfs-framework's finish module does.
	cp /etc/cryptfs/cryptfs.toml "$ROOTFS_DIR/etc/cryptfs/cryptfs.toml" ||
		fatal "cannot install the configuration on the root"
	for d in dev proc sys run; do
		mount -o move "/$d" "$ROOTFS_DIR/$d" || fatal "cannot move /$d"
	done
	exec switch_root "$ROOTFS_DIR" /sbin/init
fi
mount "$(findfs LABEL=boot)" /boot || fatal "cannot mount the boot partition"
# An OTA agent's part of a planned Secure Boot database update, and the update itself.
pcr7=$(arg cryptfs.vm.prepare_pcr7)
if [ -n "$pcr7" ]; then
	/usr/bin/cryptfs reseal --prepare --pcr7 "$pcr7" --config /etc/cryptfs/cryptfs.toml &&
		mark "prepared" || mark "prepare-failed"
fi
if [ "$(arg cryptfs.vm.reseal_finish)" = 1 ]; then
	/usr/bin/cryptfs reseal --finish --config /etc/cryptfs/cryptfs.toml &&
		mark "finished" || mark "finish-failed"
fi
if [ "$(arg cryptfs.vm.save_eventlog)" = 1 ]; then
	mount -t securityfs securityfs /sys/kernel/security
	cp /sys/kernel/security/tpm0/binary_bios_measurements /boot/eventlog.bin &&
		mark "eventlog-saved" || mark "eventlog-failed"
fi
if [ "$(arg cryptfs.vm.dbx_append)" = 1 ]; then
	# A real dbx update: the authenticated append (signed with the KEK on the host) written
	# in one write() after the 4-byte attributes NV|BS|RT|time-based auth|append.
	var=/sys/firmware/efi/efivars/dbx-d719b2cb-3d3a-4596-a3bc-dad00e67656f
	before=$(wc -c <"$var" 2>/dev/null)
	{
		printf '\147'
		head -c 3 /dev/zero
		cat "$fw_cfg/opt/cryptfs/dbx/raw"
	} >/run/dbx.upd
	chattr -i "$var" 2>/dev/null
	if dd if=/run/dbx.upd of="$var" bs="$(wc -c </run/dbx.upd)" count=1 conv=notrunc 2>/dev/null; then
		mark "dbx-appended ${before:-0} -> $(wc -c <"$var")"
	else
		mark "dbx-append-failed"
	fi
fi
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
# The mapping as the kernel runs it and the header's persistent flags, after the stage.
/usr/bin/cryptfs status --config /etc/cryptfs/cryptfs.toml | sed -n 's/^\(mapping\|sectors\): */\1 /p' |
	while read -r line; do mark "$line"; done
mark "fs-kib $(df -k "$ROOTFS_DIR" | sed -n '2p' | tr -s ' ' | cut -d' ' -f2)"
finish
