#!/usr/bin/env bash
# Start a one-node Slurm as plain daemons (munged, slurmctld, slurmd; no systemd), root only.
#   scripts/slurm/start.sh [linuxproc|cgroup]       (default linuxproc)
# Writes /etc/slurm/slurm.conf from slurm.conf.in; state, logs and pids go to
# $FTRAIN_SLURM_DIR (default /tmp/ftrain-slurm). Returns once the node takes jobs, or fails
# with the daemons' last log lines. A running cluster is stopped first (stop.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proctrack=${1:-linuxproc}
dir=${FTRAIN_SLURM_DIR:-/tmp/ftrain-slurm}
host=$(hostname -s)
began=$(date +%s%N)
bash "$here/stop.sh" >/dev/null 2>&1 || true
mkdir -p "$dir/ctld" "$dir/d" /etc/slurm /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
sed -e "s|@HOST@|$host|g" -e "s|@DIR@|$dir|g" -e "s|@PROCTRACK@|$proctrack|g" \
    -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem|g" \
    -e "s|@PORT@|${FTRAIN_SLURM_PORT:-6817}|g" -e "s|@DPORT@|$(( ${FTRAIN_SLURM_PORT:-6817} + 1 ))|g" \
    "$here/slurm.conf.in" > /etc/slurm/slurm.conf
cat > /etc/slurm/cgroup.conf <<CGROUP
CgroupPlugin=${FTRAIN_SLURM_CGROUP:-autodetect}
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
CGROUP
echo "$proctrack" > "$dir/proctrack"
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged --force 2>/dev/null || munged --force
fi
slurmctld -i
slurmd
for _ in $(seq 1 200); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qxE '(idle|mix|alloc)'; then
        ms=$(( ($(date +%s%N) - began) / 1000000 ))
        printf 'slurm: up (proctrack/%s) in %d.%02ds\n' "$proctrack" $((ms / 1000)) $((ms % 1000 / 10))
        exit 0
    fi
    if ! pgrep -x slurmctld >/dev/null || ! pgrep -x slurmd >/dev/null; then
        break
    fi
    sleep 0.1
done
echo "slurm: did not start (proctrack/$proctrack)" >&2
tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 2>/dev/null || true
bash "$here/stop.sh" >/dev/null 2>&1 || true
exit 1
