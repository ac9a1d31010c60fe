#!/bin/sh
# The systemd tier's test driver (installed by the rig as /usr/local/sbin/cryptfs-vm-driver;
# not part of the product). `run` (cryptfs-vm-driver.service, after cryptfs.service started):
# writes and re-reads files on the mounted root while cryptfs.service works, samples
# `systemctl status cryptfs`, performs the scenario's action (kernel argument
# cryptfs.vm.action=reboot-at:N or kill-at:N, N a re-encryption percentage), then reports and
# powers off. `stopped` (ExecStop= of cryptfs-vm-witness.service, which stops after
# cryptfs.service at shutdown): reports how cryptfs.service ended. Reports on the serial console
# as "CRYPTFS-VM: ..." lines for the host.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec >/dev/ttyS0 2>&1
mark() { echo "CRYPTFS-VM: $*"; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
show() { systemctl show -p "$1" --value cryptfs.service; }

if [ "$1" = stopped ]; then
	mark "after-stop result=$(show Result) status=$(show ExecMainStatus) code=$(show ExecMainCode)"
	exit 0
fi

boot_no=$(arg cryptfs.vm.boot)
action=$(arg cryptfs.vm.action)
at=${action#*:}
action=${action%%:*}
mark "systemd-up uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /data || {
	mark "fatal no /data on the root filesystem"
	systemctl poweroff
	exit 1
}
check() {
	echo 3 >/proc/sys/vm/drop_caches
	b3sum -c --quiet before.b3 || return 1
	if [ -f during.b3 ]; then b3sum -c --quiet during.b3 || return 1; fi
	return 0
}
check && mark "files-ok-at-mount $(cat during.b3 2>/dev/null | wc -l)" || mark "files-bad-at-mount"

# The dm devices' suspended flags (sysfs), as "name=0|1" words.
suspended() {
	for d in /sys/block/dm-*/dm; do
		[ -f "$d/suspended" ] && printf '%s=%s ' "$(cat "$d/name")" "$(cat "$d/suspended")"
	done
}
# Whether any dm device is suspended (shell builtins only: cheap enough to poll).
any_suspended() {
	for f in /sys/block/dm-*/dm/suspended; do
		[ -f "$f" ] || continue
		read -r s <"$f"
		[ "$s" = 1 ] && return 0
	done
	return 1
}
# A write to the mounted root that must finish within $2 tenths of a second (default 10 s): a
# suspended mapping under it would block it (in the kernel, unkillable: so it runs in the
# background and is only waited for). Sets probe_cs: how long it took, in centiseconds.
centis() {
	t=$(cut -d' ' -f1 /proc/uptime)
	echo "${t%.*}${t#*.}"
}
probe() {
	rm -f /run/probe-ok
	t0=$(centis)
	(echo "$1" >"/data/probe-$1" && sync && touch /run/probe-ok) &
	i=0
	while [ ! -f /run/probe-ok ] && [ "$i" -lt "${2:-100}" ]; do
		sleep 0.1
		i=$((i + 1))
	done
	probe_cs=$(($(centis) - t0))
	[ -f /run/probe-ok ]
}

# Every 30 s: the dm devices' suspended flags and every task sleeping somewhere else than
# the usual idle waits (a stall shows where it is stuck; reading /proc touches no disk).
(
	while sleep 30; do
		out=""
		for p in /proc/[0-9]*; do
			read -r w <"$p/wchan" 2>/dev/null || continue
			case "$w" in 0 | ep_poll | do_wait | hrtimer_nanosleep | do_select | do_sys_poll | do_epoll_wait | kthreadd | worker_thread | smpboot_thread_fn | rescuer_thread | kswapd | kcompactd | khugepaged | ksoftirqd | schedule_timeout | devtmpfsd | sigsuspend | pipe_read | wait_woken) continue ;; esac
			read -r c <"$p/comm" 2>/dev/null
			out="$out ${p#/proc/}:$c:$w"
		done
		mark "diag suspended: $(suspended) waiting:$out"
	done
) &
# The window check's tools (see `window_check`), copied to tmpfs with their libraries: the driver
# drops the page cache every round, and a tool read back from the root while recover-online
# works would read through the very stack it checks.
T=/run/cryptfs-vm-tools
mkdir -p "$T"
for b in dd b3sum dmsetup split rm; do
	p=$(command -v "$b") && cp "$p" "$T/" && ldd "$p" | awk '/=> \//{print $3}' | xargs -r cp -t "$T/"
done
tool() { LD_LIBRARY_PATH="$T" "$T/$@"; }
# The flag of the dm device named $1 in sysfs: 1 suspended, 0 live, "" absent (builtins only).
dm_flag() {
	for d in /sys/block/dm-*/dm; do
		read -r nm <"$d/name" 2>/dev/null || continue
		[ "$nm" = "$1" ] && read -r s <"$d/suspended" && echo "$s" && return
	done
}
# After a kill mid-hotzone: reads, through the mounted root's device (O_DIRECT), the 8 MiB
# before the killed run's hotzone and the 16 MiB after it (never the hotzone itself: a read
# there waits while it is suspended), once at the kill, then again and again until
# recover-online has removed the overlay (at most 0.5 s apart while the hotzone device is
# suspended, back to back after its resume), then once more. Each read is one line of per-MiB blake3 prefixes;
# "window" marks a read taken after the hotzone was resumed and before the overlay was gone,
# when the overlay's table still serves the regions around it. The host compares them: a chunk
# that reads differently in a window and then as at the kill again was served wrong.
window_check() {
	hz_mib=$1
	snap() {
		kind=$1
		read -r u _ </proc/uptime
		tool dd if=/dev/mapper/otaroot iflag=direct bs=1M skip=$((hz_mib - 8)) count=8 of=/run/wc-a 2>/dev/null
		tool dd if=/dev/mapper/otaroot iflag=direct bs=1M skip=$((hz_mib + 8)) count=16 of=/run/wc-b 2>/dev/null
		(cd /run && tool split -b 1M -d wc-a wc-a. && tool split -b 1M -d wc-b wc-b.)
		hs=""
		while read -r h _; do
			hs="$hs ${h%"${h#????????}"}"
		done <<-EOF
			$(tool b3sum /run/wc-a.* /run/wc-b.*)
		EOF
		tool rm -f /run/wc-a /run/wc-b /run/wc-a.* /run/wc-b.*
		mark "window-snap $kind t=$u hz=$hz_mib h=$hs"
	}
	snap kill
	while [ -n "$(dm_flag otaroot-overlay)" ]; do
		if [ "$(dm_flag otaroot-hotzone-forward)" = 0 ]; then
			snap window
			# recover-online holds the window open until this read is done
			# (CRYPTFS_HOLD_AT in the rig's drop-in).
			: >/run/cryptfs-vm-window-read
		else
			snap during
			# Up to 0.5 s, but no longer than until the hotzone device is resumed: the
			# window until the overlay is removed lasts seconds, and must be read.
			i=0
			while [ "$i" -lt 5 ] && [ "$(dm_flag otaroot-hotzone-forward)" = 1 ]; do
				sleep 0.1
				i=$((i + 1))
			done
		fi
	done
	snap after
	: >/run/window-check-done
}
n=0
bad=0
statuses=0
kills=0
done_action=
while :; do
	state=$(show ActiveState)
	case "$state" in
	active | activating | deactivating | reloading) ;;
	*) break ;;
	esac
	n=$((n + 1))
	f="during-$boot_no-$n.bin"
	dd if=/dev/urandom of="$f" bs=64k count=4 2>/dev/null
	sync
	b3sum "$f" >>during.b3
	sync
	# Only the new file is re-read here (through dm-crypt, caches dropped): cryptfs.service
	# runs with CPUSchedulingPolicy=idle and gets the CPU only while the workload waits, so a
	# full re-read every round would starve it on one emulated vCPU. Everything is re-read at
	# the start and at the end.
	echo 3 >/proc/sys/vm/drop_caches
	tail -n 1 during.b3 | b3sum -c --quiet || bad=$((bad + 1))
	status=$(systemctl status cryptfs.service --no-pager 2>/dev/null | sed -n 's/^ *Status: //p')
	if [ -n "$status" ]; then
		statuses=$((statuses + 1))
		mark "status-line $status"
	fi
	pct=$(show StatusText | sed -n 's/^reencrypt: *\([0-9]*\)%.*/\1/p')
	if [ -z "$done_action" ] && [ -n "$pct" ] && [ "$pct" -ge "${at:-0}" ]; then
		case "$action" in
		reboot-at)
			done_action=1
			mark "rebooting at $pct% written=$n bad-reads=$bad status-lines=$statuses"
			systemctl reboot
			exec sleep 600
			;;
		kill-at)
			pid=$(show MainPID)
			# Kill while a mapping is suspended (libcryptsetup suspends and resumes the
			# stack around hotzone switches), polled for at most 20 s of uptime. The polls
			# sleep in between: cryptfs runs at idle priority and only gets the CPU while
			# the driver waits. On a slow host a poll (a fork and exec of sleep under
			# TCG) can cost more than its sleep, so a burst can starve cryptfs between
			# two hotzones: a burst that catches nothing goes back to the workload's
			# rounds (cryptfs progresses in their sleeps) and the next round polls again,
			# up to 10 bursts.
			caught=0
			read -r u0 _ </proc/uptime
			u0=${u0%.*}
			polls=0
			while :; do
				if any_suspended; then
					caught=1
					break
				fi
				read -r u _ </proc/uptime
				[ $((${u%.*} - u0)) -ge 20 ] && break
				sleep 0.05
				polls=$((polls + 1))
			done
			bursts=$((${bursts:-0} + 1))
			mark "kill-poll burst=$bursts polls=$polls caught-suspended=$caught at $pct%"
			if [ "$caught" = 0 ] && [ "$bursts" -lt 10 ]; then
				sleep 2
				continue
			fi
			done_action=1
			# The killed run's hotzone (MiB of the data area), from the overlay's table.
			# (Shell builtins and the tmpfs tools only: a tool read from the root now could
			# wait on the suspended region and let the kill miss it.)
			set -- $(tool dmsetup info -c --noheadings -o major,minor otaroot-hotzone-forward)
			hz_dev=$1
			hz_mib=
			while read -r start _ type _ _ _ dev _; do
				[ "$type" = crypt ] && [ "$dev" = "$hz_dev" ] && hz_mib=$((start / 2048))
			done <<-EOF
				$(tool dmsetup table otaroot-overlay)
			EOF
			rm -f /run/cryptfs-vm-window-read
			kill -KILL "$pid"
			kills=$((kills + 1))
			rm -f /run/window-check-done
			[ -n "$hz_mib" ] && window_check "$hz_mib" &
			sleep 0.2
			mark "killed pid=$pid at $pct% caught-suspended=$caught after-kill: $(suspended)"
			# ExecStopPost= repairs the stack: the write must get through within 120 s
			# (recovery of one hotzone under TCG takes seconds).
			if probe "$kills" 1200; then
				mark "probe-ok after-kill $kills centiseconds=$probe_cs"
			else
				mark "probe-blocked after-kill $kills: $(suspended)"
			fi
			mark "after-probe suspended: $(suspended)"
			# No new round (it drops the page cache and writes) before the window check ends.
			i=0
			while [ ! -f /run/window-check-done ] && [ "$i" -lt 600 ]; do
				sleep 1
				i=$((i + 1))
			done
			;;
		esac
	fi
	sleep 2
done
mark "userspace-exit $(show ExecMainStatus) result=$(show Result) restarts=$(show NRestarts) written=$n bad-reads=$bad status-lines=$statuses kills=$kills"
check && mark "files-ok $(wc -l <during.b3)" || mark "files-bad"
probe final && mark "probe-ok final" || mark "probe-blocked final: $(suspended)"
state=$(cryptfs status --config /etc/cryptfs/cryptfs.toml --json | sed -n 's/^  "state": "\(.*\)",$/\1/p')
mark "state $state"
if [ "$(arg cryptfs.vm.analyze)" = 1 ]; then
	systemctl is-system-running --wait >/dev/null 2>&1
	mark "blame $(systemd-analyze blame --no-pager | grep ' cryptfs.service$' | tr -s ' ')"
	mark "analyze $(systemd-analyze time --no-pager | head -n 1)"
fi
mark "end"
systemctl poweroff
