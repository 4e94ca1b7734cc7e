#!/usr/bin/env bash
# Start, stop or query an NVIDIA MPS control daemon for one run, in a private directory (never the system's
# /tmp/nvidia-mps), for `--multiplex mps` and `--encoder-process` (see runtime/mps.py and README "Execution modes").
#
#   eval "$(scripts/mps_daemon.sh start)"   # starts it; prints the exports its clients need:
#                                           #   CUDA_MPS_PIPE_DIRECTORY=$DIR/pipe CUDA_MPS_LOG_DIRECTORY=$DIR/log
#   scripts/mps_daemon.sh status            # exit 0 while it answers, 1 otherwise
#   scripts/mps_daemon.sh stop              # `echo quit | nvidia-cuda-mps-control`, then waits until it is gone
#
# DIR is $SPACESERVE_MPS_DIR, default /tmp/spaceserve-mps-$UID (short: the control socket's path must stay under
# the 108 bytes a UNIX socket allows). Start it before the processes that should be its clients (a CUDA context
# made earlier is not an MPS client), and never leave it running: whatever runs under it should stop it on exit,
#
#   eval "$(scripts/mps_daemon.sh start)" && trap 'scripts/mps_daemon.sh stop' EXIT
#
# (scripts/mps_check.py does the same). `stop` is safe to call when nothing runs. Messages go to stderr; only the
# exports go to stdout.
set -uo pipefail

DIR=${SPACESERVE_MPS_DIR:-/tmp/spaceserve-mps-$(id -u)}
export CUDA_MPS_PIPE_DIRECTORY=$DIR/pipe CUDA_MPS_LOG_DIRECTORY=$DIR/log
CONTROL=$CUDA_MPS_PIPE_DIRECTORY/control
WAIT_S=${MPS_WAIT_S:-15}

say() { echo "mps_daemon: $*" >&2; }

answers() {  # a control socket that accepts a connection or a daemon that answers its own client, or a control
             # FIFO with the daemon alive behind it
    if [ -p "$CONTROL" ]; then
        is_daemon "$(daemon_pid)"
        return
    fi
    [ -S "$CONTROL" ] || return 1
    connects || client_answers
}

client_answers() {  # the documented interface: the control client asks the daemon for its servers
    echo get_server_list | timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1
}

connects() {
    python3 - "$CONTROL" <<'EOF' 2>/dev/null
import socket, sys
for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM, socket.SOCK_DGRAM):  # a wrong kind fails with EPROTOTYPE
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.settimeout(1.0)
        try:
            s.connect(sys.argv[1])
            sys.exit(0)
        except OSError:
            pass
sys.exit(1)
EOF
}

daemon_pid() {  # from the daemon's log: "[... Control 12345] Starting control daemon ..."
    sed -n 's/.*Control *\([0-9][0-9]*\)\] Starting control daemon.*/\1/p' "$CUDA_MPS_LOG_DIRECTORY/control.log" \
        2>/dev/null | tail -n 1
}

is_daemon() {  # the pid is (still) an MPS control daemon, not a process that reused its number
    [ -n "$1" ] && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -q 'nvidia-cuda-mps-control'
}

exports() {
    echo "export CUDA_MPS_PIPE_DIRECTORY=$CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY=$CUDA_MPS_LOG_DIRECTORY"
}

case ${1:-} in
    start)
        if ! command -v nvidia-cuda-mps-control >/dev/null; then
            say "nvidia-cuda-mps-control is not on PATH (it ships with the NVIDIA driver)"
            exit 2
        fi
        if answers; then
            say "already running in $DIR (pid $(daemon_pid))"
            exports
            exit 0
        fi
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        rm -f "$CONTROL"  # a stale socket of a daemon that died
        # the daemon keeps the descriptors it is given: with our stdout it would hold the pipe of whoever reads
        # this script's exports (eval "$(...)", subprocess.run) open until it quits
        if ! nvidia-cuda-mps-control -d </dev/null >/dev/null 2>&1; then
            say "nvidia-cuda-mps-control -d failed"
            exit 1
        fi
        for _ in $(seq $((WAIT_S * 10))); do
            if answers; then
                say "started in $DIR (pid $(daemon_pid))"
                exports
                exit 0
            fi
            sleep 0.1
        done
        say "started, but its control socket $CONTROL does not answer after ${WAIT_S}s; stopping it." \
            "In $CUDA_MPS_PIPE_DIRECTORY: $(ls -l "$CUDA_MPS_PIPE_DIRECTORY" 2>&1 | tr '\n' ';')" \
            "control.log: $(tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>&1 | tr '\n' ';')" \
            "get_server_list: $(echo get_server_list | timeout 10 nvidia-cuda-mps-control 2>&1 | tail -n 3 | tr '\n' ';')"
        "$0" stop
        exit 1
        ;;
    stop)
        pid=$(daemon_pid)
        if answers; then
            echo quit | nvidia-cuda-mps-control >&2 || true
        fi
        for _ in $(seq $((WAIT_S * 10))); do
            if ! answers && ! is_daemon "$pid"; then
                say "stopped (${DIR})"
                exit 0
            fi
            sleep 0.1
        done
        if is_daemon "$pid"; then
            say "still running after ${WAIT_S}s: terminating its pid $pid"
            kill "$pid" 2>/dev/null
            sleep 1
            is_daemon "$pid" && kill -9 "$pid" 2>/dev/null
        fi
        answers && { say "could not stop the daemon in $DIR"; exit 1; }
        exit 0
        ;;
    status)
        if answers; then
            say "running in $DIR (pid $(daemon_pid))"
            exports
            exit 0
        fi
        say "not running in $DIR"
        exit 1
        ;;
    *)
        echo "usage: $0 start|stop|status   (directory: \$SPACESERVE_MPS_DIR, default /tmp/spaceserve-mps-\$UID)" >&2
        exit 2
        ;;
esac
