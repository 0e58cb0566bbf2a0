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
# The kernel's own module requests (libcrc32c asks for crypto-crc32c, nft for its
# expressions) go to busybox's modprobe: the host's kmod wants index files the unpacked
# kernel package does not have.
echo /run/bb/modprobe > /proc/sys/kernel/modprobe
# what the testbed's layouts, the fake CNI and kube-proxy's rules (nft) use (tls: for kTLS
# work on 6.1 and 6.12). Not ipip: its fallback device takes the name tunl0 in every
# namespace, where the IPIP layout makes its own (tests/src/tunnel.rs).
for m in veth bridge br_netfilter sch_ingress cls_bpf act_mirred cls_u32 vxlan tls tun \
         crc32c_generic nfnetlink nf_tables nf_conntrack nf_nat nft_chain_nat nft_nat nft_masq nft_ct \
         nft_fib nft_fib_ipv4 nft_fib_ipv6 nft_counter; do
  /run/bb/modprobe $m 2>/dev/null || echo "[stage2] no module $m"
done
ip link set lo up; hostname guest; ulimit -l unlimited; ulimit -n 20000
echo "[stage2] kernel $(uname -r) ready after $(cut -d' ' -f1 /proc/uptime)s"
if [ -f /mnt/run.sh ]; then bash /mnt/run.sh; rc=$?
else setsid -c bash -i </dev/ttyS0 >/dev/ttyS0 2>&1; rc=$?; fi
echo "ZGUEST-EXIT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)s"
sync; echo o >/proc/sysrq-trigger; sleep 5; /run/bb/poweroff -f
