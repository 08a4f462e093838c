#!/usr/bin/env bash
# Start single-threaded dask workers on this node for a static deqntk cluster.
#
#   cluster/static/start-workers.sh [--nworkers N] [--memory-limit SIZE] [--scratch DIR]
#                                   [--scheduler-file FILE] [--run-dir DIR] [--foreground]
#
# One worker process per core by default (N = nproc), each with one thread: deqntk tiles are
# single-threaded, and numba / the BLAS are limited to one thread here.  SIZE is per worker
# process (default "auto" = node memory / N); deqntk sizes tiles from it.  DIR is node-local
# scratch for worker files (default $TMPDIR or /tmp) -- not the kernel store.  Run it on every
# node (ssh, pdsh, srun); without --foreground it detaches and writes a pid file in the run
# directory (stop.sh stops it).  Each worker's diagnostics HTTP server listens on 127.0.0.1
# (a free port) unless DEQNTK_WORKER_DASHBOARD_ADDRESS says otherwise (e.g. ":0" for every
# interface); DEQNTK_WORKER_HOST sets the address the workers themselves listen on.
set -euo pipefail
nworkers="$(nproc)"
memory="auto"
scratch="${TMPDIR:-/tmp}"
run_dir="${DEQNTK_RUN_DIR:-$PWD/deqntk-cluster}"
scheduler_file=""
foreground=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nworkers) nworkers="$2"; shift 2 ;;
        --memory-limit) memory="$2"; shift 2 ;;
        --scratch) scratch="$2"; shift 2 ;;
        --scheduler-file) scheduler_file="$2"; shift 2 ;;
        --run-dir) run_dir="$2"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        *) echo "start-workers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
scheduler_file="${scheduler_file:-${SCHEDULER_FILE:-$run_dir/scheduler.json}}"
if [[ ! -s "$scheduler_file" ]]; then
    echo "start-workers.sh: scheduler file $scheduler_file not found (start-scheduler.sh)" >&2
    exit 1
fi
export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# glibc keeps tile-sized temporaries (<= 32 MiB) for reuse instead of dask's default
# MALLOC_TRIM_THRESHOLD_=65536, which makes each one fresh memory that faults in again
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456
name="$(hostname -s 2>/dev/null || uname -n)-$$"
local_dir="$scratch/deqntk-worker-$name"
mkdir -p "$local_dir" "$run_dir"
cmd=(dask worker --scheduler-file "$scheduler_file" --nworkers "$nworkers" --nthreads 1
     --memory-limit "$memory" --local-directory "$local_dir" --death-timeout 300
     --dashboard-address "${DEQNTK_WORKER_DASHBOARD_ADDRESS:-127.0.0.1:0}" --name "$name")
if [[ -n "${DEQNTK_WORKER_HOST:-}" ]]; then
    cmd+=(--host "$DEQNTK_WORKER_HOST")
fi
if [[ "$foreground" == 1 ]]; then
    exec "${cmd[@]}"
fi
nohup setsid "${cmd[@]}" --pid-file "$run_dir/worker-$name.pid" \
    >"$run_dir/worker-$name.log" 2>&1 </dev/null &
echo "workers $name: $nworkers x 1 thread, memory limit $memory each, scratch $local_dir"
