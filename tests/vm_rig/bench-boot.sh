# Row 3 of issue 12, sourced by bench.sh (cryptfs.bench.mode=boot): a first boot's provisioning
# up to the root mounted, cryptfs against the reference, on both paths, then a later boot's
# unlock against a plain token unlock.
# Round r takes four fresh disks (vdb, vdc, ... in this order): a plain ext4 image for the
# reference, one for cryptfs, the reference's CI image (keyslot 31, the well-known passphrase)
# for the reference, one for cryptfs. The order of the two tools alternates by round.
# What a first boot runs, timed from its first command to the root mounted:
# - reference, plain ext4 (LmP's initramfs, notes/lmp-reference.md steps 3, 6, 8): e2fsck -p -f,
#   resize2fs 32 MiB smaller, `cryptsetup reencrypt --encrypt --reduce-device-size 32m`,
#   `systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 --wipe-slot=password`, open with the
#   token, mount.
# - reference, CI image (steps 6, 7, 8): systemd-cryptenroll as above, open with the token,
#   mount. Its `cryptsetup reencrypt --init-only` is not run: the stock CLI (2.6.1) asks a
#   passphrase of every keyslot and cannot unlock one with a token, and the passphrase is
#   wiped by then; it would add a keyslot and a header write (tens of ms) to the reference.
# - cryptfs, either path: `cryptfs run --stage initramfs`, `cryptfs unlock --device-path`, mount:
#   what units/initramfs-framework/cryptfs runs.
# A later boot, on cryptfs's plain-path disk once its userspace stage finished (untimed): the
# same three cryptfs commands against `cryptsetup open --token-only` + mount (the plain
# unlock), and the reference's disk opened the plain way, alternating, three times each.
# Both sides use the same swtpm; no boot partition is mounted (cryptfs's boot directory is a
# directory in /run); the temporary keyslot of the reference's in-place encryption is PBKDF2
# with 1000 iterations, as the tokens' keyslots.
disks="b c d e f g h i j k l m"
disk_n() { # n (1-based)
	set -- $(echo "$disks" | cut -d' ' -f"$1")
	echo "/dev/vd$1"
}
up() { cut -d' ' -f1 /proc/uptime; }
mkdir -p /mnt/root
later_reps=$(arg cryptfs.bench.later_reps)
later_reps=${later_reps:-3}

# Marks a failed step and returns non-zero: the host fails the bench on any "-failed" marker.
failed() { # what tool path round
	mark "$1-failed tool=$2 path=$3 round=$4"
	return 1
}

mounted() { # tool path round t0 device name
	mount -t ext4 "$5" /mnt/root || failed mount "$1" "$2" "$3" || return 1
	t1=$(up)
	mark "first-boot tool=$1 path=$2 round=$3 t0=$4 t1=$t1"
	umount /mnt/root
}

ref_enroll_open() { # path round disk
	PASSWORD=$(cat /etc/bench.pass) systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 \
		--wipe-slot=password "$3" >/run/enroll.log 2>&1 || {
		cat /run/enroll.log
		failed enroll reference "$1" "$2"
		return 1
	}
	cryptsetup open --token-only "$3" ref || failed open reference "$1" "$2"
}

ref_first() { # path round disk
	t0=$(up)
	if [ "$1" = plain ]; then
		e2fsck -p -f "$3" >/dev/null 2>&1
		[ $? -le 1 ] || failed e2fsck reference "$1" "$2" || return
		kib=$(($(blockdev --getsize64 "$3") / 1024 - 32768))
		resize2fs "$3" "${kib}K" >/dev/null 2>&1 || failed shrink reference "$1" "$2" || return
		cryptsetup reencrypt --encrypt --type luks2 --batch-mode --reduce-device-size 32m \
			--key-file /etc/bench.pass --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "$3" ||
			failed encrypt reference "$1" "$2" || return
	fi
	ref_enroll_open "$1" "$2" "$3" || return
	mounted reference "$1" "$2" "$t0" /dev/mapper/ref
	cryptsetup close ref
}

# cryptfs's configuration for one disk (bench.sh's cryptfs_config), in its own file.
ours_config() { # disk name
	cryptfs_config "/run/cryptfs-$2.toml" "$1" "/run/boot-$2"
	echo "/run/cryptfs-$2.toml"
}

# What the initramfs module runs: the stage, then the unlock; the root device on stdout.
# With "stamp", the stage's log lines (CRYPTFS_LOG=info) are stamped with the uptime into
# /run/stage.log, which ours_first puts on the console once the root is mounted ("ours-log"):
# where the first boot's time goes.
ours_boot() { # config [stamp]
	if [ -n "$2" ]; then
		{
			CRYPTFS_LOG=info cryptfs run --stage initramfs --config "$1" 2>&1
			echo $? >/run/stage.rc
		} | while read -r line; do echo "t=$(up) $line"; done >/run/stage.log
		[ "$(cat /run/stage.rc)" = 0 ] || {
			cat /run/stage.log
			return 1
		}
	else
		cryptfs run --stage initramfs --config "$1" >/run/stage.log 2>&1 || {
			cat /run/stage.log
			return 1
		}
	fi
	cryptfs unlock --device-path --config "$1" 2>/run/unlock.log || {
		cat /run/unlock.log
		return 1
	}
}

ours_first() { # path round disk
	conf=$(ours_config "$3" "$1-$2")
	t0=$(up)
	dev=$(ours_boot "$conf" stamp) || failed stage cryptfs "$1" "$2" || return
	mounted cryptfs "$1" "$2" "$t0" "$dev"
	while read -r line; do mark "ours-log path=$1 round=$2 $line"; done </run/stage.log
	state=$(cryptfs status --config "$conf" --json | sed -n 's/^  "state": "\(.*\)",$/\1/p')
	mark "state tool=cryptfs path=$1 round=$2 state=$state"
	cryptsetup close ours
}

# A later boot of cryptfs's plain-path disk of round $1, three ways.
later() { # round disk_ours disk_ref
	conf=/run/cryptfs-plain-$1.toml
	# First the rest of the first boot: the userspace stage (header backup, grow).
	dev=$(cryptfs unlock --device-path --config "$conf" 2>/dev/null) || failed unlock cryptfs later "$1" || return
	mount -t ext4 "$dev" /mnt/root || failed mount cryptfs later "$1" || return
	cryptfs run --stage userspace --config "$conf" >/run/stage.log 2>&1 || {
		cat /run/stage.log
		failed userspace cryptfs later "$1"
	}
	umount /mnt/root
	cryptsetup close ours
	state=$(cryptfs status --config "$conf" --json | sed -n 's/^  "state": "\(.*\)",$/\1/p')
	mark "state tool=cryptfs path=later round=$1 state=$state"
	for rep in $(seq 1 "$later_reps"); do
		for way in cryptfs plain reference; do
			t0=$(up)
			case $way in
			cryptfs) dev=$(ours_boot "$conf") || failed unlock cryptfs later "$1" || continue ;;
			plain)
				cryptsetup open --token-only "$2" ours || failed unlock plain later "$1" || continue
				dev=/dev/mapper/ours
				;;
			reference)
				cryptsetup open --token-only "$3" ours || failed unlock reference later "$1" || continue
				dev=/dev/mapper/ours
				;;
			esac
			mount -t ext4 "$dev" /mnt/root || failed mount "$way" later "$1" || continue
			t1=$(up)
			mark "later-boot way=$way round=$1 rep=$rep t0=$t0 t1=$t1"
			umount /mnt/root
			cryptsetup close ours
		done
	done
	# Untimed: one more later boot with cryptfs's debug log stamped, where its time goes.
	{
		CRYPTFS_LOG=debug cryptfs run --stage initramfs --config "$conf" 2>&1
		CRYPTFS_LOG=debug cryptfs unlock --device-path --config "$conf" 2>&1
	} | while read -r line; do echo "t=$(up) $line"; done >/run/later.log
	while read -r line; do mark "later-log round=$1 $line"; done </run/later.log
	cryptsetup close ours
}

for r in $(seq 1 "$rounds"); do
	ref_plain=$(disk_n $((4 * r - 3)))
	our_plain=$(disk_n $((4 * r - 2)))
	ref_ci=$(disk_n $((4 * r - 1)))
	our_ci=$(disk_n $((4 * r)))
	if [ $((r % 2)) -eq 1 ]; then
		ref_first plain "$r" "$ref_plain"
		ours_first plain "$r" "$our_plain"
		ref_first ci "$r" "$ref_ci"
		ours_first ci "$r" "$our_ci"
	else
		ours_first plain "$r" "$our_plain"
		ref_first plain "$r" "$ref_plain"
		ours_first ci "$r" "$our_ci"
		ref_first ci "$r" "$ref_ci"
	fi
	later "$r" "$our_plain" "$ref_plain"
done
mark "bench-done"
