# Shared by the benchmark scripts in loadtest/ (sourced, not run): free ports, waiting for
# a gateway, CPU seconds of a process, and killing what the script started on exit.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits up to 10 s for the gateway on port $1 to answer /healthz.
wait_up() { for _ in $(seq 100); do curl -sf "localhost:$1/healthz" >/dev/null && return 0; sleep 0.1; done; return 1; }
# utime+stime of pid $1, in seconds.
cpu_s() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
# On exit, whatever the script started and is still running (its own jobs only).
cleanup() { for p in $(jobs -pr); do kill -KILL "$p" 2>/dev/null; done; }
trap cleanup EXIT
