# The session benchmark, sourced by scripts/bench. Needs root (namespaces,
# a tap, nftables). Everything happens in a network namespace it creates.
#
# Baseline: a bare QEMU boot of the same kernel and initramfs, with the same
# machine, accelerator (TCG), CPU model, firmware and kernel arguments
# (`TCG_CPU`, `DIRECT_BOOT_FIRMWARE` and `KERNEL_ARGS` in
# supervisor/src/vm/argv.rs, whose tests check this file) and memory,
# straight to init, timed from spawn to init's first line on the serial
# console (busybox's echo). ZEROLEASE_BENCH_SESSION_CPUS sets the vCPUs of
# both (default 2, as the agent manifests ask). Both inits start cold: the
# image has no /sbin/modprobe, which the kernel would run (busybox) four
# times while it boots; with it, the bare boot's busybox came to init warm
# (`true` ran in 5 ms, against 80 ms cold), a head start the guest agent,
# a program of its own, never had.
#
# Against it: `zerolease run` of a session whose command is `true`, timed
# from the process start to each phase from the session's own audit records
# (millisecond timestamps): created (vault open, image verified), booting
# (leases granted), guest hello (jail, proxy, QEMU, kernel, guest agent up),
# command started (provisioned), and teardown (stopping to destroyed).
# The session's report adds the jail's time and the boot phase (QEMU's spawn
# to the hello); the guest agent's console stamps (guest uptime, kept as
# sessions/<id>/console.log) split that boot into QEMU's start (before the
# guest kernel's clock starts), the kernel (to init), and the guest agent's
# own boot (modules, control port; the network comes up on a thread beside
# it); its provisioning runs from the control port to the agent command
# started, the host's answer and any wait for the network included.
#
# Bare boots and sessions alternate. The supervisor's overhead is the
# median, over the pairs, of a session's time to the command minus the bare
# boot just before it; the same less the guest agent's own (emulated) work
# is reported too. Memory: the RSS of `zerolease run` while its session
# idles (QEMU, which holds the guest's RAM, not counted).

# 15 pairs by default: the bare boot alone varies by ±150 ms from boot to
# boot, so the median of 7 pairs moved by 100 ms from run to run.
bench_session_runs=${ZEROLEASE_BENCH_SESSION_RUNS:-15}
# vCPUs of both the session and the bare boot; the agent manifests
# (claude-code, codex) ask for 2.
bench_session_cpus=${ZEROLEASE_BENCH_SESSION_CPUS:-2}

# guest_ms CONSOLE_LOG FROM TO: milliseconds of guest uptime between the
# guest agent's console lines containing FROM and TO (empty if missing).
guest_ms() {
    awk -v from="$2" -v to="$3" '
        /^zerolease-guest \[/ {
            t = $2; gsub(/[\[\]:]/, "", t)
            if (a == "" && index($0, from)) a = t
            if (b == "" && index($0, to)) b = t
        }
        END { if (a != "" && b != "") printf "%d\n", (b - a) * 1000 + 0.5 }' "$1"
}

# guest_at CONSOLE_LOG TEXT: the guest's uptime in milliseconds at the
# guest agent's first console line containing TEXT (empty if missing).
guest_at() {
    awk -v what="$2" '
        /^zerolease-guest \[/ && index($0, what) {
            t = $2; gsub(/[\[\]:]/, "", t); printf "%d\n", t * 1000 + 0.5; exit
        }' "$1"
}

ms_now() { echo $(( $(date +%s%N) / 1000000 )); }

# median of the arguments
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

emit() { # metric value unit baseline_metric baseline
    local ratio
    ratio=$(awk -v v="$2" -v b="$5" 'BEGIN { if (b > 0) printf "%.3f", v / b; else print "null" }')
    if [ ${#json[@]} -gt 0 ]; then
        printf '{"metric":"%s","value":%s,"unit":"%s","baseline":%s,"baseline_metric":"%s","ratio":%s}\n' \
            "$1" "$2" "$3" "$5" "$4" "$ratio"
    else
        printf '%-36s %10s %-4s %-26s %10s %8s\n' "$1" "$2" "$3" "$4" "$5" "$ratio"
    fi
}

run_session_bench() {
    [ "$(id -u)" -eq 0 ] || die "the session benchmark boots VMs behind a jail: run it as root"
    ensure_packages jq qemu-system-x86 nftables iproute2 busybox-static cpio gzip kmod curl git file
    log "building zerolease (release) and the minimal image"
    cargo build --quiet --release --bin zerolease
    scripts/build-image minimal >&2
    local zl="$ZL_ROOT/target/release/zerolease" img="$ZL_ROOT/images/out/minimal"
    # A fresh build leaves about 80 MiB of the image dirty in the page
    # cache. Its writeback starts some 30 s later, inside a timed session,
    # where it stalled the session's first fsync'd audit write by 40-220 ms
    # (a later pair's "image check" looked like a rehash): flush it now.
    sync
    local tmp ns
    tmp="$(mktemp -d -t zerolease-bench.XXXXXX)"
    ns="zl-bench-$$"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    trap 'ip netns del "'"$ns"'" 2>/dev/null; rm -rf "'"$tmp"'"' EXIT

    export ZEROLEASE_HOME="$tmp/home"
    cat >"$tmp/bench.yaml" <<EOM
name: bench
image: minimal
accel: tcg
resources: { memory: 512MiB, cpus: $bench_session_cpus }
command: ["true"]
EOM
    # Bare boots and sessions alternate, and each session is compared with
    # the bare boot just before it: a drift of the machine's speed during
    # the benchmark (the bare boot alone varies by ±300 ms from minute to
    # minute here) then shifts both sides of each pair alike.
    log "bare QEMU boot of the same kernel and initramfs to init, then \`zerolease run\` of \`true\`, alternating ($bench_session_runs pairs, $bench_session_cpus vCPUs)"
    local bare=() to_cmd=() teardown=() hello=() provision=() prep=() g_boot=() g_prov=() id start console t0 t1
    local jail=() qemu=() kernel=() check=()
    for _ in $(seq "$bench_session_runs"); do
        # Init's first output ends the bare boot (then init exits, the
        # kernel panics and QEMU exits, untimed).
        t0=$(ms_now)
        t1=$(qemu-system-x86_64 -accel tcg -machine q35 -cpu max,-erms,-fsrm -smp "$bench_session_cpus" -m 512 \
            -nodefaults -no-user-config -display none -no-reboot -serial stdio -bios qboot.rom \
            -kernel "$img/vmlinux" -initrd "$img/initramfs.cpio" \
            -append "console=ttyS0 quiet panic=-1 cryptomgr.notests=1 rdinit=/bin/busybox -- echo zerolease-bench-init" 2>&1 |
            { grep -m1 -q zerolease-bench-init && ms_now; cat >/dev/null; })
        [ -n "$t1" ] || die "the bare boot never reached init"
        bare+=($((t1 - t0)))

        start=$(ms_now)
        ip netns exec "$ns" "$zl" run "$tmp/bench.yaml" >/dev/null 2>&1 || die "the benchmark session failed"
        id=$("$zl" --json audit ls | jq -r '[.[] | select(.event == "session_transition")] | last | .session')
        local audit
        audit=$("$zl" --json audit ls --session "$id")
        phase() { jq -r --arg p "$1" \
            '[.[] | select(.event == "session_transition") | select(.detail | startswith($p + ":"))][0].time' <<<"$audit" |
            python3 -c 'import sys,datetime; t=sys.stdin.read().strip(); print(int(datetime.datetime.fromisoformat(t.replace("Z","+00:00")).timestamp()*1000))'; }
        local b p r s d
        b=$(phase booting); p=$(phase provisioning); r=$(phase running)
        s=$(phase stopping); d=$(phase destroyed)
        prep+=($((b - start)))
        hello+=($((p - b)))
        provision+=($((r - p)))
        to_cmd+=($((r - start)))
        teardown+=($((d - s)))
        console="$ZEROLEASE_HOME/sessions/$id/console.log"
        local gb gp
        gb=$(guest_ms "$console" ": started" ": control port open")
        gp=$(guest_ms "$console" ": control port open" ": provisioned; the agent command runs")
        [ -n "$gb" ] && [ -n "$gp" ] || die "no guest agent timings in $console"
        g_boot+=("$gb")
        g_prov+=("$gp")
        # The boot phase runs from QEMU's spawn to the hello, which the guest
        # sends right after its "control port open" line: less the guest's
        # uptime then, it is QEMU's start (firmware and kernel loading
        # included) before the guest kernel's clock starts.
        local report="$ZEROLEASE_HOME/sessions/$id/report.json" boot_ms port_at started_at
        boot_ms=$(jq '.durations.phases[] | select(.phase == "boot") | .seconds * 1000 | round' "$report")
        port_at=$(guest_at "$console" ": control port open")
        started_at=$(guest_at "$console" ": started")
        jail+=("$(jq '.durations.phases[] | select(.phase == "jail") | .seconds * 1000 | round' "$report")")
        check+=("$(jq '.durations.phases[] | select(.phase == "image_check") | .seconds * 1000 | round' "$report")")
        qemu+=($((boot_ms - port_at)))
        kernel+=("$started_at")
    done
    local bare_m cmd_m
    bare_m=$(median "${bare[@]}")
    cmd_m=$(median "${to_cmd[@]}")

    log "idle session memory"
    cat >"$tmp/idle.yaml" <<EOM
name: bench
image: minimal
accel: tcg
resources: { memory: 512MiB, cpus: $bench_session_cpus }
command: ["sleep", "20"]
EOM
    ip netns exec "$ns" "$zl" run "$tmp/idle.yaml" >/dev/null 2>&1 &
    local runpid=$! rss=0 qrss=0 q
    for _ in $(seq 60); do
        q=$(pgrep -f 'process=zl-' | head -1 || true)
        if [ -n "$q" ] && "$zl" --json ps | jq -e '.[0].state == "running"' >/dev/null 2>&1; then
            sleep 2
            rss=$(awk '/VmRSS/ {print $2}' "/proc/$(pgrep -f "zerolease run $tmp/idle.yaml" | head -1)/status" 2>/dev/null || echo 0)
            qrss=$(awk '/VmRSS/ {print $2}' "/proc/$q/status" 2>/dev/null || echo 0)
            break
        fi
        sleep 0.5
    done
    wait "$runpid" || true

    # Pair by pair: each session against the bare boot just before it.
    local over=() rest=() i
    for i in "${!to_cmd[@]}"; do
        over+=($((to_cmd[i] - bare[i])))
        rest+=($((to_cmd[i] - bare[i] - g_boot[i] - g_prov[i])))
    done
    log "pairs (bare boot / session to the command (its prepare phase, image check), ms): $(for i in "${!to_cmd[@]}"; do printf '%s/%s(%s,%s) ' "${bare[i]}" "${to_cmd[i]}" "${prep[i]}" "${check[i]}"; done)"
    # One boot differs from the next by a few hundred milliseconds under
    # TCG, so the median of few pairs moves by about as much: the quartiles
    # say how far to trust it (more pairs: ZEROLEASE_BENCH_SESSION_RUNS).
    log "overhead over the pairs, ms: $(printf '%s\n' "${over[@]}" | sort -n | awk '{a[NR]=$1} END {printf "min %d, quartiles %d / %d / %d, max %d", a[1], a[int((NR+3)/4)], a[int((NR+1)/2)], a[int((3*NR+1)/4)], a[NR]}')"
    if [ ${#json[@]} -eq 0 ]; then
        printf '%-36s %10s %-4s %-26s %10s %8s\n' metric value unit baseline value ratio
    fi
    emit session_time_to_command "$cmd_m" ms bare_qemu_boot_to_init "$bare_m"
    emit session_overhead_over_bare_boot "$(median "${over[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_phase_prepare "$(median "${prep[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_phase_jail "$(median "${jail[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_phase_boot_to_hello "$(median "${hello[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_phase_qemu_start "$(median "${qemu[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_phase_kernel_to_init "$(median "${kernel[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_phase_provision "$(median "${provision[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_guest_agent_boot "$(median "${g_boot[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_guest_provision "$(median "${g_prov[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    # What is left of the overhead once the guest agent's own (emulated)
    # work is taken out, pair by pair: the host side (vault, image check,
    # jail, proxy, QEMU's extra devices, the protocol's round trips).
    emit session_overhead_outside_guest_agent "$(median "${rest[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_teardown "$(median "${teardown[@]}")" ms bare_qemu_boot_to_init "$bare_m"
    emit session_supervisor_rss_idle "$rss" KiB qemu_rss_idle "$qrss"
}
