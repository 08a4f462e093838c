#!/usr/bin/env bash
# Stop what start-scheduler.sh / start-workers.sh started on this node (from their pid files).
#
#   cluster/static/stop.sh [--run-dir DIR]
#
# Workers first (SIGTERM: they close cleanly, a running tile is simply not marked done), then
# the scheduler.  The kernel store keeps every finished tile; `deqntk compute` resumes.
set -euo pipefail
run_dir="${DEQNTK_RUN_DIR:-$PWD/deqntk-cluster}"
if [[ "${1:-}" == "--run-dir" ]]; then run_dir="$2"; fi
shopt -s nullglob
for f in "$run_dir"/worker-*.pid "$run_dir"/scheduler.pid; do
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" && echo "stopped $(basename "$f" .pid) (pid $pid)"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$f"
done
