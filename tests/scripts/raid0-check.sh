#!/usr/bin/env bash
# Runs INSIDE tests/scripts/kernel-vm (a kernel with md): three blank loops, `nodekeeper disks
# prepare` in raid0 mode, then checks /proc/mdstat (raid0 over exactly those three), the mount,
# and that later runs re-use the array: still assembled -> untouched; stopped -> re-assembled,
# never re-created (same md UUID, same filesystem UUID, the file written in between survives).
# Prints "RAID0 OK" on success. Everything lives in the VM's tmpfs and vanishes with it.
set -euo pipefail
BIN=${NODEKEEPER_BIN:-target/debug/nodekeeper}
w=$(mktemp -d)
fail() { echo "raid0-check: $*" >&2; cat /proc/mdstat >&2 || true; exit 1; }

loops=()
for i in 1 2 3; do
  truncate -s 256M "$w/d$i.img"
  loops+=("$(losetup --find --show "$w/d$i.img")")
done
names=("${loops[@]#/dev/}")
cat >"$w/config.yaml" <<C
disks:
  devices: [${names[0]}, ${names[1]}, ${names[2]}]
  minSizeBytes: 1048576
  mode: raid0
  discoveryDir: $w/mnt
  hostMountNamespace: false
C
prepare() { "$BIN" disks prepare --json --config "$w/config.yaml" --state-dir "$w/state" 2>"$w/log" || { cat "$w/log" >&2; fail "disks prepare failed"; }; }
md_of() { ls "/sys/block/${names[0]}/holders/" | grep '^md' | head -1; }

echo "== first run: create"
prepare >"$w/r1.json"; cat "$w/r1.json"
grep -q '"action":"raid0 created"' "$w/r1.json" || fail "first run did not create the array"
md=$(md_of); [ -n "$md" ] || fail "no md device holds ${names[0]}"
grep -E "^$md : active raid0" /proc/mdstat || fail "$md is not an active raid0"
for n in "${names[@]}"; do grep -E "^$md : .*\b$n\[" /proc/mdstat >/dev/null || fail "$n is not a member of $md"; done
[ "$(ls /sys/block/$md/slaves | wc -l)" = 3 ] || fail "$md does not have exactly 3 members"
mnt="$w/mnt/md-nodekeeper"
mountpoint -q "$mnt" || fail "$mnt is not mounted"
findmnt -rn -o SOURCE "$mnt" | grep -q "$md\|md/nodekeeper" || fail "$mnt is not $md"
md_uuid=$(mdadm --detail --export "/dev/$md" | sed -n 's/^MD_UUID=//p')
fs_uuid=$(blkid -p -s UUID -o value "/dev/$md")
echo "md=$md md_uuid=$md_uuid fs_uuid=$fs_uuid"
echo precious >"$mnt/file"; sync

echo "== second run: array active and mounted -> left alone"
prepare >"$w/r2.json"; cat "$w/r2.json"
grep -q '"action":"raid0 already-mounted"' "$w/r2.json" || fail "second run did not find the array mounted"

echo "== third run: unmounted and stopped (a reboot) -> re-assembled, not re-created"
umount "$mnt"; mdadm --stop "/dev/$md"
[ -z "$(md_of)" ] || fail "the array did not stop"
prepare >"$w/r3.json"; cat "$w/r3.json"
grep -q '"action":"raid0 assembled+mounted"' "$w/r3.json" || fail "third run did not re-assemble"
md=$(md_of); [ -n "$md" ] || fail "not re-assembled"
[ "$(mdadm --detail --export "/dev/$md" | sed -n 's/^MD_UUID=//p')" = "$md_uuid" ] || fail "md UUID changed: re-created"
[ "$(blkid -p -s UUID -o value "/dev/$md")" = "$fs_uuid" ] || fail "filesystem UUID changed: re-formatted"
[ "$(cat "$mnt/file")" = precious ] || fail "the file did not survive"

umount "$mnt"; mdadm --stop "/dev/$md"; for l in "${loops[@]}"; do losetup -d "$l"; done
echo "RAID0 OK"
