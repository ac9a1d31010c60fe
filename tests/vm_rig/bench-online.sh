# Row 2 of issue 12, sourced by bench.sh (cryptfs.bench.mode=online): online re-encryption of a
# mounted CI image while a workload writes and fsyncs on it, cryptfs's userspace stage against
# the reference's way, at the unit's priority (nice 19, idle CPU and I/O class) for both, same
# hotzone (8 MiB) and resilience (checksum). Round r takes two fresh copies of one image: disk
# 2r-1 for the reference, 2r for cryptfs (vdb, vdc, ...); the order alternates by round.
# Reports, per run: the online command's start and end (guest uptime), its own progress lines
# (about one a second), and the workload's fio JSON idle and during.
disks="b c d e f g h i"
disk_n() { # n (1-based)
	set -- $(echo "$disks" | cut -d' ' -f"$1")
	echo "/dev/vd$1"
}
up() { cut -d' ' -f1 /proc/uptime; }
prio() { nice -n 19 chrt --idle 0 ionice -c 3 "$@"; }

# The workload: 4 KiB random writes, each followed by fsync, 20 per second, on the mounted
# filesystem; fio's JSON (one line) goes to the console.
workload_start() { # dir
	fio --name=workload --directory="$1" --rw=randwrite --bs=4k --size=8M --fsync=1 \
		--rate_iops=20 --time_based --runtime=3600 --output-format=json \
		--output=/run/workload.json >/dev/null 2>&1 &
	workload=$!
	sleep 1
}
workload_stop() { # tool round phase
	kill -INT "$workload"
	wait "$workload"
	mark "workload tool=$1 round=$2 phase=$3 json=$(tr -d '\n\t' </run/workload.json)"
}
ref_run() { # round disk
	cryptsetup reencrypt --init-only --batch-mode --key-file /etc/bench.pass --hotzone-size 8M \
		--resilience checksum --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "$2" ||
		mark "init-failed tool=reference"
	cryptsetup open --key-file /etc/bench.pass "$2" ref || mark "open-failed tool=reference"
	mkdir -p /mnt/ref && mount -t ext4 /dev/mapper/ref /mnt/ref || mark "mount-failed tool=reference"
	workload_start /mnt/ref
	sleep 10
	workload_stop reference "$1" idle
	# LmP's luks-reencryption: repair (recovers a crashed hotzone; nothing to do here), then
	# the resume of the online re-encryption.
	cryptsetup repair --batch-mode --key-file /etc/bench.pass "$2" >/dev/null 2>&1 ||
		mark "repair-refused tool=reference"
	workload_start /mnt/ref
	t0=$(up)
	prio cryptsetup reencrypt --resume-only --active-name ref --key-file /etc/bench.pass \
		--hotzone-size 8M --progress-frequency 1 --progress-json --batch-mode 2>&1 |
		while read -r line; do mark "ref-progress round=$1 t=$(up) $line"; done
	t1=$(up)
	workload_stop reference "$1" during
	mark "online tool=reference round=$1 t0=$t0 t1=$t1 rc=0"
	umount /mnt/ref
	cryptsetup close ref
}

ours_run() { # round disk
	conf=/run/cryptfs-$1.toml
	cryptfs_config "$conf" "$2" "/run/boot-$1" "hotzone_size = 8388608"
	cryptfs run --stage initramfs --config "$conf" >/dev/null 2>&1 || mark "init-failed tool=cryptfs"
	dev=$(cryptfs unlock --device-path --config "$conf" 2>/dev/null) || mark "open-failed tool=cryptfs"
	mkdir -p /mnt/ours && mount -t ext4 "$dev" /mnt/ours || mark "mount-failed tool=cryptfs"
	workload_start /mnt/ours
	sleep 10
	workload_stop cryptfs "$1" idle
	workload_start /mnt/ours
	t0=$(up)
	CRYPTFS_LOG=info prio cryptfs run --stage userspace --config "$conf" 2>&1 |
		while read -r line; do
			case $line in
			*"reencrypt:"*) mark "ours-progress round=$1 t=$(up) $line" ;;
			*) mark "ours-log round=$1 t=$(up) $line" ;;
			esac
		done
	t1=$(up)
	workload_stop cryptfs "$1" during
	state=$(cryptfs status --config "$conf" --json | sed -n 's/^  "state": "\(.*\)",$/\1/p')
	mark "online tool=cryptfs round=$1 t0=$t0 t1=$t1 state=$state"
	umount /mnt/ours
	cryptsetup close ours
}

for r in $(seq 1 "$rounds"); do
	ref_disk=$(disk_n $((2 * r - 1)))
	our_disk=$(disk_n $((2 * r)))
	if [ $((r % 2)) -eq 1 ]; then
		ref_run "$r" "$ref_disk"
		ours_run "$r" "$our_disk"
	else
		ours_run "$r" "$our_disk"
		ref_run "$r" "$ref_disk"
	fi
done
mark "bench-done"
