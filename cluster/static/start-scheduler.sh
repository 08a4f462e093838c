#!/usr/bin/env bash
# Start a dask scheduler in the background for a static deqntk cluster.
#
#   cluster/static/start-scheduler.sh [--host ADDR] [--port PORT] [--dashboard ADDR]
#                                     [--run-dir DIR]
#
# Writes DIR/scheduler.json (pass it to start-workers.sh and `deqntk compute --scheduler`),
# DIR/scheduler.pid and DIR/scheduler.log; prints the scheduler and dashboard addresses.
# Defaults: --host 127.0.0.1 (use the node's address or --host 0.0.0.0 for other nodes),
# --port 8786 (0 = any free port), --dashboard 127.0.0.1:8787 ($DEQNTK_DASHBOARD_ADDRESS),
# --run-dir ./deqntk-cluster.  The dashboard is an unauthenticated HTTP server: it listens on
# this node only unless asked (e.g. --dashboard 0.0.0.0:8787 or :8787 for every interface;
# otherwise reach it through `ssh -L 8787:127.0.0.1:8787 NODE`).
set -euo pipefail
host="${DEQNTK_SCHEDULER_HOST:-127.0.0.1}"
port=8786
dashboard="${DEQNTK_DASHBOARD_ADDRESS:-127.0.0.1:8787}"
run_dir="${DEQNTK_RUN_DIR:-$PWD/deqntk-cluster}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --dashboard) dashboard="$2"; shift 2 ;;
        --run-dir) run_dir="$2"; shift 2 ;;
        *) echo "start-scheduler.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$run_dir"
run_dir="$(cd "$run_dir" && pwd)"
rm -f "$run_dir/scheduler.json"
nohup setsid dask scheduler --host "$host" --port "$port" --dashboard-address "$dashboard" \
    --scheduler-file "$run_dir/scheduler.json" --pid-file "$run_dir/scheduler.pid" \
    >"$run_dir/scheduler.log" 2>&1 </dev/null &
for _ in $(seq 120); do
    if [[ -s "$run_dir/scheduler.json" ]]; then
        "${PYTHON:-python3}" - "$run_dir/scheduler.json" "$dashboard" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
port = info.get("services", {}).get("dashboard")
host = sys.argv[2].rpartition(":")[0].strip("[]")
where = "" if host not in ("", "0.0.0.0", "::") else " (listening on every interface)"
host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
host = f"[{host}]" if ":" in host else host
print(f"scheduler {info['address']}  dashboard http://{host}:{port}/status{where}")
PY
        echo "scheduler file $run_dir/scheduler.json"
        exit 0
    fi
    sleep 0.5
done
echo "start-scheduler.sh: no scheduler after 60 s; see $run_dir/scheduler.log" >&2
exit 1
