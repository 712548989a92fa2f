#!/bin/busybox sh
# /init of the vhost_guest test's initramfs. The scenario comes from the kernel command line
# (vstor.mode=write|verify|readonly|reconnect|loop); results go to the console as `VSTOR-<KEY> ...`
# lines that tests/vhost_guest.rs parses. Every path ends in `poweroff -f`, which makes QEMU exit.

/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1

say() { echo "VSTOR-$*"; }

finish() {
    say DONE
    sync
    poweroff -f
}

fail() {
    say FAIL "$*"
    dmesg | tail -n 30
    poweroff -f
}

mode=
for word in $(cat /proc/cmdline); do
    case "$word" in
        vstor.mode=*) mode=${word#vstor.mode=} ;;
    esac
done
say MODE "$mode"

for module in $(cat /etc/modules); do
    insmod "/lib/modules/$module" || fail "insmod $module"
done

tries=0
until [ -b /dev/vda ]; do
    tries=$((tries + 1))
    [ "$tries" -le 200 ] || fail "no /dev/vda"
    sleep 0.1
done

sectors=$(cat /sys/block/vda/size)
size=$((sectors * 512))
say SIZE "$size"
say RO "$(cat /sys/block/vda/ro)"
say QUEUES "$(ls /sys/block/vda/mq | wc -l)"

# The file system leaves the device's last MiB free for a raw region, so the guest also writes
# and reads the very end of the device.
tail_mib=1
fs_kib=$((size / 1024 - tail_mib * 1024))
tail_block=$((size / 65536 - tail_mib * 16))

# `VSTOR-<key> <name> <sha256>` for the file /mnt/<name>.
report_file() {
    sum=$(sha256sum "/mnt/$2") || fail "sha256sum $2"
    say "$1" "$2" "${sum%% *}"
}

report_tail() {
    dd if=/dev/vda of=/tmp/tail bs=65536 skip="$tail_block" count=$((tail_mib * 16)) 2>/dev/null \
        || fail "read tail"
    sum=$(sha256sum /tmp/tail) || fail "sha256sum tail"
    rm /tmp/tail
    say SUM tail "${sum%% *}"
}

# The digest of every regular file on the mounted file system, then of the raw last MiB.
report_sums() {
    for path in $(find /mnt -type f | sort); do
        report_file SUM "${path#/mnt/}"
    done
    report_tail
}

# write_random <name> <block size> <count>: a file of random bytes under /mnt.
write_random() {
    dd if=/dev/urandom of="/mnt/$1" bs="$2" count="$3" 2>/dev/null || fail "write $1"
}

case "$mode" in
write)
    mke2fs -q /dev/vda "$fs_kib" > /dev/null || fail mke2fs
    mount -t ext2 /dev/vda /mnt || fail "mount rw"
    mkdir /mnt/dir
    write_random small.bin 4096 3
    write_random one-byte.bin 1 1
    write_random big.bin 65536 48
    write_random dir/nested.bin 1000 700
    dd if=/dev/urandom of=/dev/vda bs=65536 seek="$tail_block" count=$((tail_mib * 16)) conv=fsync 2>/dev/null \
        || fail "write tail"
    sync
    umount /mnt || fail umount
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext2 -o ro /dev/vda /mnt || fail "mount ro"
    report_sums
    umount /mnt
    finish
    ;;
verify)
    mount -t ext2 -o ro /dev/vda /mnt || fail "mount ro"
    report_sums
    umount /mnt
    finish
    ;;
readonly)
    if dd if=/dev/zero of=/dev/vda bs=65536 count=1 seek="$tail_block" conv=fsync 2>/dev/null; then
        say WRITE-OK
    else
        say WRITE-FAILED
    fi
    if mount -t ext2 -o rw /dev/vda /mnt 2>/dev/null && touch /mnt/new 2>/dev/null; then
        say MOUNT-RW-OK
        umount /mnt
    else
        say MOUNT-RW-FAILED
        umount /mnt 2>/dev/null
    fi
    mount -t ext2 -o ro /dev/vda /mnt || fail "mount ro"
    report_sums
    umount /mnt
    finish
    ;;
reconnect)
    # The host restarts `vstor serve` while this guest runs, with its file system mounted.
    before="before/small.bin before/big.bin before/odd.bin"
    after="after/small.bin after/big.bin after/odd.bin"
    mke2fs -q /dev/vda "$fs_kib" > /dev/null || fail mke2fs
    # noatime: reading the files back must not dirty inodes that the kernel would write back
    # later, maybe while the server is down.
    mount -t ext2 -o noatime /dev/vda /mnt || fail "mount rw"
    mkdir /mnt/before /mnt/after
    write_random before/small.bin 4096 3
    write_random before/big.bin 65536 48
    write_random before/odd.bin 1000 700
    sync
    echo 3 > /proc/sys/vm/drop_caches
    for name in $before; do
        report_file SUM "$name"
    done
    sync
    # Idle from here until the host says go: vhost-user-backend keeps no inflight record, so a
    # request in flight while the server restarts would not be resubmitted.
    say READY-FOR-RESTART
    read -r line < /dev/console || fail "read from the console"
    say RESUMED "$line"
    # Read the earlier files from the device again, through the restarted server.
    echo 3 > /proc/sys/vm/drop_caches
    for name in $before; do
        report_file REREAD "$name"
    done
    write_random after/small.bin 4096 5
    write_random after/big.bin 65536 32
    write_random after/odd.bin 999 333
    dd if=/dev/urandom of=/dev/vda bs=65536 seek="$tail_block" count=$((tail_mib * 16)) conv=fsync 2>/dev/null \
        || fail "write tail"
    sync
    umount /mnt || fail umount
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext2 -o ro /dev/vda /mnt || fail "mount ro"
    for name in $after; do
        report_file SUM "$name"
    done
    report_tail
    umount /mnt
    finish
    ;;
loop)
    # The edge failover tests (tests/edge_failover.rs): raw 1 MiB regions written (O_DIRECT,
    # then fsync) and read back in a loop while the host kills the volume's owner, until the host
    # sends a line on the console. Each completed round is reported with its region and digest;
    # at the end every region is read back once more against its last digest.
    regions=$((size / 1048576))
    mkdir -p /tmp/sums
    (read -r line < /dev/console; touch /tmp/stop) &
    say LOOPING "$regions"
    round=0
    while [ ! -e /tmp/stop ]; do
        round=$((round + 1))
        region=$(( (round * 7) % regions ))
        dd if=/dev/urandom of=/tmp/blk bs=65536 count=16 2>/dev/null || fail "make data"
        want=$(sha256sum /tmp/blk)
        want=${want%% *}
        dd if=/tmp/blk of=/dev/vda bs=65536 seek=$((region * 16)) count=16 oflag=direct conv=fsync,notrunc 2>/dev/null \
            || fail "write round $round region $region"
        dd if=/dev/vda of=/tmp/back bs=65536 skip=$((region * 16)) count=16 iflag=direct 2>/dev/null \
            || fail "read round $round region $region"
        got=$(sha256sum /tmp/back)
        got=${got%% *}
        [ "$got" = "$want" ] || fail "round $round: region $region reads back $got, wrote $want"
        echo "$want" > "/tmp/sums/$region"
        say ROUND "$round $region $want"
    done
    checked=0
    for file in /tmp/sums/*; do
        region=${file##*/}
        dd if=/dev/vda of=/tmp/back bs=65536 skip=$((region * 16)) count=16 iflag=direct 2>/dev/null \
            || fail "final read of region $region"
        got=$(sha256sum /tmp/back)
        [ "${got%% *}" = "$(cat "$file")" ] || fail "region $region lost its last write"
        checked=$((checked + 1))
    done
    say VERIFIED "$checked"
    say IOERRORS "$(dmesg | grep -c -e 'I/O error' -e 'blk_update_request')"
    finish
    ;;
*)
    fail "unknown mode '$mode'"
    ;;
esac
