#!/usr/bin/env bash
# A single-node SLURM on this machine (loopback only), to try deqntk's batch path on a
# workstation and to test it (tests/test_slurm.py uses this script).
#
#   cluster/slurm/local-slurm.sh start [DIR]   # install (root + apt) if needed, start, wait
#   export SLURM_CONF=DIR/slurm.conf           # printed by `start`; sbatch/squeue/scancel use it
#   cluster/slurm/local-slurm.sh status [DIR]
#   cluster/slurm/local-slurm.sh stop [DIR]    # stops the daemons this script started
#
# DIR (default /tmp/deqntk-slurm) holds everything: slurm.conf, a munge key and socket,
# the controller state, spool, logs and pid files; nothing under /etc is written or read
# (SLURM_CONF and a private munge socket).  The node is this host, NodeAddr=127.0.0.1,
# with the cores slurmd detects (DEQNTK_SLURM_CPUS overrides), one partition `debug`.
# The daemons run as root (the job's processes run as the submitting user) and listen on
# DEQNTK_SLURM_PORT (controller, default 6817) and the next port (slurmd).
set -euo pipefail

cmd="${1:-start}"
DIR="$(realpath -m "${2:-${DEQNTK_SLURM_DIR:-/tmp/deqntk-slurm}}")"
PORT="${DEQNTK_SLURM_PORT:-6817}"
export SLURM_CONF="$DIR/slurm.conf"

die() { echo "local-slurm: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
        || die "slurm-wlm and munge are not installed; as root: apt-get install -y slurm-wlm munge"
    echo "local-slurm: installing slurm-wlm and munge (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    local host cpus mem
    host="$(hostname -s)"
    cpus="${DEQNTK_SLURM_CPUS:-$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')}"
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
    mkdir -p "$DIR"/{state,spool,log,munge}
    chmod 0755 "$DIR" "$DIR/munge"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    fi
    cat >"$SLURM_CONF" <<EOF
# written by deqntk_dist cluster/slurm/local-slurm.sh: one node on loopback
ClusterName=deqntk-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    write_config
    if ! alive "$DIR/munged.pid"; then
        munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
            --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed" || die "munged did not start (see $DIR/log/munged.log)"
    fi
    alive "$DIR/slurmctld.pid" || slurmctld -f "$SLURM_CONF" -c \
        || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    alive "$DIR/slurmd.pid" || slurmd -f "$SLURM_CONF" \
        || die "slurmd did not start (see $DIR/log/slurmd.log)"
    local state=""
    for _ in $(seq 1 120); do
        state="$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
        [[ "$state" == idle* ]] && break
        sleep 0.5
    done
    [[ "$state" == idle* ]] || die "the node is not idle after 60 s (state '${state:-none}'; logs in $DIR/log)"
    echo "local-slurm: node $(hostname -s) idle; export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local f pid
    for f in slurmd slurmctld munged; do
        if alive "$DIR/$f.pid"; then
            pid="$(cat "$DIR/$f.pid")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$f.pid"
    done
    echo "local-slurm: stopped"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    *) die "usage: local-slurm.sh start|status|stop [DIR]" ;;
esac
