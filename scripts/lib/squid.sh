# A throwaway squid for benchmarks: loopback only, CONNECT to one port of
# 127.0.0.1 only, no cache, everything in a temp dir, run in the foreground
# as a child of the calling script. Source it after common.sh.
#
#   squid_start UPSTREAM_PORT   # sets SQUID_PID, SQUID_PORT, SQUID_DIR
#   squid_stop                  # idempotent; call it from an EXIT trap

SQUID_PID=
SQUID_PORT=
SQUID_DIR=

# free_port: prints a loopback TCP port nobody listens on (best effort).
free_port() {
    local p i
    for i in $(seq 1 50); do
        p=$(( 20000 + RANDOM % 12000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free loopback port found"
}

# squid_config DIR PORT UPSTREAM_PORT: the minimal config, on stdout.
squid_config() {
    local dir="$1" port="$2" up="$3"
    cat <<CONF
http_port 127.0.0.1:$port
acl CONNECT method CONNECT
acl bench_port port $up
acl bench_dst dst 127.0.0.1
http_access allow CONNECT bench_dst bench_port
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_log $dir/cache.log
pid_filename $dir/squid.pid
coredump_dir $dir
netdb_filename none
pinger_enable off
shutdown_lifetime 0 seconds
max_filedescriptors 65536
visible_hostname zerolease-bench
CONF
}

squid_start() {
    local up="$1"
    command -v squid >/dev/null || [ -x /usr/sbin/squid ] || die "squid is not installed"
    local bin
    bin="$(command -v squid || echo /usr/sbin/squid)"
    SQUID_DIR="$(mktemp -d -t zerolease-squid.XXXXXX)"
    # Run as root, squid drops to its effective user, which must write here.
    if [ "$(id -u)" -eq 0 ] && id proxy >/dev/null 2>&1; then
        chown proxy:proxy "$SQUID_DIR"
    fi
    SQUID_PORT="$(free_port)"
    squid_config "$SQUID_DIR" "$SQUID_PORT" "$up" >"$SQUID_DIR/squid.conf"
    "$bin" -N -f "$SQUID_DIR/squid.conf" >"$SQUID_DIR/stderr.log" 2>&1 &
    SQUID_PID=$!
    local i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$SQUID_PORT") 2>/dev/null; then
            log "squid $("$bin" -v | head -n1 | sed 's/.*Version //') listening on 127.0.0.1:$SQUID_PORT (pid $SQUID_PID)"
            return 0
        fi
        if ! kill -0 "$SQUID_PID" 2>/dev/null; then
            cat "$SQUID_DIR/stderr.log" "$SQUID_DIR/cache.log" >&2 2>/dev/null || true
            SQUID_PID=
            die "squid exited during start-up"
        fi
        sleep 0.1
    done
    cat "$SQUID_DIR/cache.log" >&2 2>/dev/null || true
    squid_stop
    die "squid did not listen on 127.0.0.1:$SQUID_PORT within 10 s"
}

squid_stop() {
    if [ -n "$SQUID_PID" ]; then
        kill -TERM "$SQUID_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 50); do
            kill -0 "$SQUID_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SQUID_PID" 2>/dev/null || true
        wait "$SQUID_PID" 2>/dev/null || true
        SQUID_PID=
    fi
    if [ -n "$SQUID_DIR" ]; then
        rm -rf "$SQUID_DIR"
        SQUID_DIR=
    fi
}
