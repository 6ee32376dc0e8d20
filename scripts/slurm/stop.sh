#!/usr/bin/env bash
# Stop the one-node Slurm that start.sh started: slurmd, slurmctld, then munged; waits for
# each to leave (SIGKILL after 10 s). Safe to run when nothing runs.
set -uo pipefail
dir=${FTRAIN_SLURM_DIR:-/tmp/ftrain-slurm}
stop() {   # pid file or process name
    local pid=""
    [ -f "$1" ] && pid=$(cat "$1" 2>/dev/null)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || pid=$(pgrep -x "$2" | head -n 1)
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
}
if pgrep -x slurmctld >/dev/null; then   # jobs first: their slurmstepd would outlive slurmd
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
    for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
fi
stop "$dir/slurmd.pid" slurmd
stop "$dir/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
echo "slurm: stopped"
