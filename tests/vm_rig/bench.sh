#!/bin/sh
# /init of the VM bench (tests/vm_bench.rs, `cargo xtask bench --vm`): rows 5 and 6 of issue 12
# (cryptfs.bench.mode=online: row 2, in bench-online.sh; cryptfs.bench.mode=boot: row 3, in
# bench-boot.sh).
# Disks: vdb holds the reference's layout (its CI image: `cryptsetup reencrypt --encrypt`,
# 512-byte sectors), vdc cryptfs's 4096-byte layout (`cryptfs image encrypt --sector-size
# auto`), vdd a blank disk for the raw rate. Both images open with the CI passphrase in
# /etc/bench.pass. Reports "CRYPTFS-VM: ..." lines on the serial console; the host makes the
# table.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp
mount -t tmpfs tmpfs /run
# No udev here: libdevmapper creates the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

mark() { echo "CRYPTFS-VM: $*"; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
finish() {
	mark "end"
	poweroff -f
}

for m in virtio_pci virtio_blk dm_mod dm_crypt xts aesni_intel algif_skcipher; do
	modprobe "$m" || mark "modprobe $m failed"
done
# The host names the last of its disks (the steady-state rows have three: vdb to vdd).
last=$(arg cryptfs.bench.last_disk)
last=/dev/${last:-vdd}
i=0
while [ ! -b "$last" ] && [ "$i" -lt 100 ]; do
	sleep 0.1
	i=$((i + 1))
done
[ -b "$last" ] || {
	mark "fatal no $last"
	finish
}
rounds=$(arg cryptfs.bench.rounds)
runtime=$(arg cryptfs.bench.runtime)
mark "guest cpus=$(grep -c ^processor /proc/cpuinfo) aesni=$(grep -c -w aes /proc/cpuinfo) mem-kib=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)"
# cryptfs's configuration for one bench disk (rows 2 and 3): the swtpm, no Secure Boot in this
# guest, no boot-phase lock (several provisionings in one boot), background resume, and any
# further [reencrypt] lines.
cryptfs_config() { # file disk boot_dir [reencrypt line]
	mkdir -p "$3"
	cat >"$1" <<CONF
device = "$2"
boot_dir = "$3"
mapping_name = "ours"

[kek]
kind = "tpm2"

[kek.tpm2]
tcti = "device:/dev/tpmrm0"
require_secure_boot = false
boot_phase_lock = false

[reencrypt]
resume = "background"
$4
CONF
}
[ "$(arg cryptfs.bench.mode)" = online ] && {
	. /bench-online.sh
	finish
}
[ "$(arg cryptfs.bench.mode)" = boot ] && {
	. /bench-boot.sh
	finish
}

# Row 6: the cipher's ceiling in this guest (the kernel's AES-XTS through AF_ALG, memory only).
for r in $(seq 1 "$rounds"); do
	# "aes-xts 512b <enc> MiB/s <dec> MiB/s"
	line=$(cryptsetup benchmark -c aes-xts-plain64 -s 512 2>&1 | tail -n 1)
	# shellcheck disable=SC2086
	set -- $line
	mark "cipher round=$r enc=$3 dec=$5"
done

# One fio job on a block device: direct I/O, so the page cache in the guest measures nothing.
# Terse fields: 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS.
fio_job() { # layout round device rw bs iodepth
	out=$(fio --name=bench --filename="$3" --direct=1 --ioengine=libaio --rw="$4" --bs="$5" \
		--iodepth="$6" --size=160M --runtime="$runtime" --ramp_time=1 --time_based \
		--minimal 2>&1 | tail -n 1)
	echo "$out" | awk -F';' -v l="$1" -v r="$2" -v j="$4-$5" \
		'NF > 49 { printf "CRYPTFS-VM: fio layout=%s round=%s job=%s read-kib-s=%s read-iops=%s write-kib-s=%s write-iops=%s\n", l, r, j, $7, $8, $48, $49; ok = 1 }
		END { if (!ok) printf "CRYPTFS-VM: fio-failed layout=%s job=%s\n", l, j }'
}
fio_all() { # layout round device
	fio_job "$1" "$2" "$3" read 1M 4
	fio_job "$1" "$2" "$3" write 1M 4
	fio_job "$1" "$2" "$3" randread 4k 16
	fio_job "$1" "$2" "$3" randwrite 4k 16
}
# A layout: its disk opened through dm-crypt (optionally with the workqueue bypass), fio, closed.
layout() { # name round disk [cryptsetup open options]
	name=$1 round=$2 disk=$3
	shift 3
	if [ "$name" = raw ]; then
		fio_all raw "$round" "$disk"
		return
	fi
	cryptsetup open --key-file /etc/bench.pass "$@" "$disk" bench || {
		mark "open-failed layout=$name"
		return
	}
	sector=$(cryptsetup status bench | sed -n 's/^ *sector size: *\([0-9]*\).*/\1/p')
	flags=$(cryptsetup status bench | sed -n 's/^ *flags: *//p')
	mark "layout $name sector=$sector flags=${flags:-none}"
	fio_all "$name" "$round" /dev/mapper/bench
	cryptsetup close bench
}
run_layouts() { # round order
	for l in $2; do
		case $l in
		raw) layout raw "$1" /dev/vdd ;;
		ref512) layout ref512 "$1" /dev/vdb ;;
		ref512-nowq) layout ref512-nowq "$1" /dev/vdb --perf-no_read_workqueue --perf-no_write_workqueue ;;
		cryptfs4096) layout cryptfs4096 "$1" /dev/vdc ;;
		cryptfs4096-nowq) layout cryptfs4096-nowq "$1" /dev/vdc --perf-no_read_workqueue --perf-no_write_workqueue ;;
		esac
	done
}
# Rows 5 and 6: every layout each round, the order reversed every other round so that neither
# side always runs first.
order="raw ref512 cryptfs4096 ref512-nowq cryptfs4096-nowq"
reversed="cryptfs4096-nowq ref512-nowq cryptfs4096 ref512 raw"
for r in $(seq 1 "$rounds"); do
	if [ $((r % 2)) -eq 1 ]; then run_layouts "$r" "$order"; else run_layouts "$r" "$reversed"; fi
done
mark "bench-done"
finish
