#!/bin/bash
# PID 1 in the guest after switch_root: the remaining mounts, the modules the testbed uses,
# then /mnt/run.sh (written by `cargo xtask kernels`), then power off. ZGUEST-EXIT on the
# console carries its exit code to the host.
export PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/bb
export HOME=/root LANG=C.UTF-8
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /run/netns /run/lock /var/tmp
# what the testbed's layouts and the fake CNI use (tls: for kTLS work on 6.1 and 6.12)
for m in veth bridge br_netfilter sch_ingress cls_bpf act_mirred cls_u32 vxlan ipip tls tun; do
  /run/bb/modprobe $m 2>/dev/null || echo "[stage2] no module $m"
done
ip link set lo up; hostname guest; ulimit -l unlimited; ulimit -n 20000
echo "[stage2] kernel $(uname -r) ready after $(cut -d' ' -f1 /proc/uptime)s"
if [ -f /mnt/run.sh ]; then bash /mnt/run.sh; rc=$?
else setsid -c bash -i </dev/ttyS0 >/dev/ttyS0 2>&1; rc=$?; fi
echo "ZGUEST-EXIT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)s"
sync; echo o >/proc/sysrq-trigger; sleep 5; /run/bb/poweroff -f
