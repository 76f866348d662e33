#!/usr/bin/env bash
# `make bench` (QUICK=1 for a short run): llm-gateway against a direct connection to the
# upstream and against nginx as a plain reverse proxy, measured in the same run.
#
# Builds the release binary and the two bench programs (examples/mock_upstream.rs, a fast mock
# of Anthropic's API; examples/ssebench.rs, an SSE load client), installs wrk and nginx from the
# package registry when missing, starts the mock, nginx (proxy_buffering off, upstream
# keep-alive) and the gateway (4 API-key accounts and 1 OAuth account logged in through the CLI's
# own flow against the mock, sticky sessions on, usage ledger on, access log to a file), and
# measures:
#   - JSON (wrk): requests/s, p50/p99, added latency versus direct, CPU per request, at 1, 16
#     and 64 connections; for Anthropic requests and for OpenAI requests through the converter;
#   - SSE (ssebench): per-event delay p50/p99/max, time to first byte, completed streams, peak
#     RSS and threads, at 10, 200 and 1000 concurrent streams (40 events 100 ms apart);
#   - idle RSS, release and static binary size, CLI start-up time (list-accounts);
#   - scale (after the others; SCALE=0 skips it): several gateway instances sharing state
#     through one Redis, behind nginx as a load balancer, against one instance behind the same
#     nginx and one instance with local state and no nginx; JSON at 16 and 64 connections, Redis'
#     CPU and commands per request. See the phase's own comment for what it can and cannot show.
# With two or more cores, load generators run on core 0 and every server on core 1.
#
# Switches: QUICK=1 (short run), BINARY=static (serve with the static musl build, `make
# static`, instead of the glibc release build), SCALE=0 (no scale phase), SCALE_BACKEND=local (the scale
# phase's instances keep local state, no `state:` section: checks the load balancer and the
# multi-instance start-up with a gateway that has no Redis backend), ONLY=PHASE[,PHASE...] (run
# only these of json, sse, footprint, scale; such a partial run prints its figures and leaves
# bench/results.* and README.md as they were).
#
# Prints `name value` lines, then tables and PASS/MISS per target; writes bench/results.txt and
# bench/results.md, and regenerates README's Performance section from the latter. A missed
# target never fails the run: the exit status is non-zero only when something broke.

set -euo pipefail

case "${QUICK:-0}" in "" | 0 | no | false) QUICK=0 ;; *) QUICK=1 ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}
MUSL=x86_64-unknown-linux-musl

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'bench: %s\n' "$*" >&2
    exit 1
}

if ((QUICK)); then
    JSON_SECS=3 WARM_SECS=1 SSE_LEVELS=(10 200) SSE_EVENTS=10 SSE_REPS=1
else
    JSON_SECS=10 WARM_SECS=2 SSE_LEVELS=(10 200 1000) SSE_EVENTS=40 SSE_REPS=3
fi
SSE_INTERVAL_MS=100
CONNS=(1 16 64)
case "${SCALE:-1}" in "" | 0 | no | false) SCALE=0 ;; *) SCALE=1 ;; esac
SCALE_BACKEND=${SCALE_BACKEND:-redis}
[[ $SCALE_BACKEND == redis || $SCALE_BACKEND == local ]] ||
    { echo "bench: SCALE_BACKEND is redis or local, not $SCALE_BACKEND" >&2; exit 1; }
ONLY=${ONLY:-}
for p in ${ONLY//,/ }; do
    case $p in json | sse | footprint | scale) ;; *)
        echo "bench: ONLY takes json, sse, footprint and scale, not $p" >&2
        exit 1
        ;;
    esac
done
# Whether a phase runs: every phase without ONLY, else the phases it names; scale also needs SCALE.
phase() {
    [[ $1 == scale ]] && ((!SCALE)) && return 1
    [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]
}

# ---------------------------------------------------------------------------------------------
# Build and tools (not part of the timed run).

log "building release binaries"
$CARGO build --release --bins --examples --quiet
GW=$ROOT/target/release/llm-gateway
MOCK=$ROOT/target/release/examples/mock_upstream
SSEBENCH=$ROOT/target/release/examples/ssebench
STATIC=$ROOT/target/$MUSL/release/llm-gateway
GW_RELEASE=$GW
case "${BINARY:-release}" in
release) ;;
static)
    log "building the static binary to serve with (make static)"
    make --no-print-directory static CARGO="$CARGO" >/dev/null || die "make static failed"
    GW=$STATIC
    ;;
*) die "BINARY is release or static, not $BINARY" ;;
esac

sbin_path() { command -v "$1" || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || true; }
apt_install() {
    [[ $(id -u) == 0 ]] || die "missing $*: install them (apt-get install -y $*) or run as root"
    command -v apt-get >/dev/null || die "missing $* and no apt-get to install them"
    log "installing $* from the package registry"
    apt-get install -y -qq "$@" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
[[ -n $(sbin_path nginx) ]] || missing+=(nginx-light)
if phase scale; then
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
fi
((${#missing[@]} == 0)) || apt_install "${missing[@]}"
if ! command -v hyperfine >/dev/null && [[ $(id -u) == 0 ]]; then
    apt_install hyperfine || log "no hyperfine; timing the CLI with a shell loop"
fi
NGINX=$(sbin_path nginx)
for tool in wrk jq curl "$NGINX"; do command -v "$tool" >/dev/null || die "$tool is still missing"; done
if phase scale; then
    for tool in redis-server redis-cli; do command -v "$tool" >/dev/null || die "$tool is still missing"; done
fi

# Always (incremental when nothing changed): a static binary left from older code would report
# an old size.
if ((!QUICK)) && phase footprint; then
    log "building the static binary (make static)"
    make --no-print-directory static CARGO="$CARGO" >/dev/null ||
        log "make static failed: the static binary size is left out"
fi

# ---------------------------------------------------------------------------------------------
# Helpers.

START=$(date +%s)
LOADAVG_START=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($LOADAVG_START > 1) }"; then
    log "load average $LOADAVG_START: other work is running, the figures will be noisy"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-bench.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if ((rc == 0)); then rm -rf "$WORK"; else echo "bench: logs kept in $WORK" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if (($(nproc) >= 2)); then
    LOAD_CPU=0 SERVER_CPU=1
    LOAD=(taskset -c 0) SERVER=(taskset -c 1)
else
    log "one core only: nothing is pinned, and the figures mean little"
    LOAD_CPU=0 SERVER_CPU=0 LOAD=() SERVER=()
fi
CLK_TCK=$(getconf CLK_TCK)

declare -A R=()
NAMES=()
put() {
    R[$1]=$2
    NAMES+=("$1")
    printf '%s %s\n' "$1" "$2"
}
get() { echo "${R[$1]:-n/a}"; }
isnum() { [[ $1 =~ ^-?[0-9]+([.][0-9]+)?$ ]]; }
# calc DECIMALS EXPR: awk arithmetic on numbers already checked.
calc() { awk "BEGIN { printf \"%.$1f\", $2 }"; }
ratio() { # a/b to 2 decimals, n/a when either is missing or b is 0
    if isnum "$1" && isnum "$2" && [[ $(calc 9 "$2 == 0") == 0.000000000 ]]; then
        calc 2 "$1 / $2"
    else echo n/a; fi
}
minus() { if isnum "$1" && isnum "$2"; then calc 3 "$1 - $2"; else echo n/a; fi; }
# Whether the awk condition holds; false when a figure is missing.
holds() {
    local expr=$1
    shift
    for v in "$@"; do isnum "$v" || return 1; done
    [[ $(awk "BEGIN { print ($expr) ? 1 : 0 }") == 1 ]]
}

# Waits for a line matching $2 in file $1 written by process $3; prints it.
wait_line() {
    for _ in $(seq 200); do
        if grep -m1 -- "$2" "$1" 2>/dev/null; then return 0; fi
        kill -0 "$3" 2>/dev/null || die "process $3 exited early: $(tail -5 "$1" "${1%.out}.err" 2>/dev/null)"
        sleep 0.05
    done
    die "timed out waiting for '$2' in $1"
}
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on port $1"
}
# CPU time (utime + stime, clock ticks) of the given processes, threads included.
ticks() {
    local t=0 p
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$t"
}
# "busy total" jiffies of one core.
core_jiffies() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
# CPU seconds used by this shell's finished children (bash's `times`, second line), from a file
# `times >FILE` wrote: `times` has to run in this shell itself, not in a $(...) subshell.
children_cpu() {
    awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } print t }' "$1"
}
status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo n/a; }

# ---------------------------------------------------------------------------------------------
# The servers.

log "starting the mock upstream, nginx and the gateway (work dir $WORK)"
"${SERVER[@]}" "$MOCK" 127.0.0.1:0 >"$WORK/mock.out" 2>"$WORK/mock.err" &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
MOCK_ADDR=$(wait_line "$WORK/mock.out" "listening on" "$MOCK_PID" | sed 's/listening on //')
MOCK_URL=http://$MOCK_ADDR

# start_nginx LAUNCH DIR PORT SERVER...: nginx as a plain streaming reverse proxy (one worker,
# keep-alive to the SERVERs, round robin over them), like the README's example, on
# 127.0.0.1:PORT, with its config and logs in DIR, started under the command prefix in the array
# named LAUNCH. Sets NGINX_STARTED to its pid.
start_nginx() {
    local -n launch=$1
    local dir=$2 port=$3
    shift 3
    mkdir -p "$dir"
    {
        [[ $(id -u) == 0 ]] && echo "user root;"
        cat <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    client_max_body_size 32m;
    upstream backends {
$(printf '        server %s;\n' "$@")
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    "${launch[@]}" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/nginx.out" 2>&1 &
    NGINX_STARTED=$!
    PIDS+=("$NGINX_STARTED")
    wait_port "$port"
}

# nginx in front of the mock.
NGINX_PORT=$("$MOCK" --free-port)
start_nginx SERVER "$WORK/nginx" "$NGINX_PORT" "$MOCK_ADDR"
NGINX_PID=$NGINX_STARTED
NGINX_URL=http://127.0.0.1:$NGINX_PORT
nginx_pids() { echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" || true); }
for _ in $(seq 100); do
    NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1 || true)
    [[ -n $NGINX_WORKER ]] && break
    sleep 0.05
done
[[ -n $NGINX_WORKER ]] || die "nginx started no worker: $(cat "$WORK/nginx/nginx.out" "$WORK/nginx/error.log")"

# The gateway: a realistic team config. Access log on, to a file in the work dir.
CFG=$WORK/gateway/config.yaml
mkdir -p "$WORK/gateway"
cat >"$CFG" <<EOF
upstream:
  base_url: $MOCK_URL
admin:
  listen: "off"
sticky:
  enabled: true
usage:
  enabled: true
oauth:
  token_url: $MOCK_URL/v1/oauth/token
log:
  access: true
  access_file: access.log
accounts: []
client_keys: []
EOF
gw() { "$GW" --config "$CFG" "$@"; }
for i in 1 2 3 4; do
    echo "sk-ant-api03-bench-$i-$(printf '%040d' "$i")-AA" | gw add-api-key --name="API key $i" >/dev/null
done
OAUTH_ID=$(gw add-oauth --name="OAuth team" --client-id=bench-client --json | jq -r .id)
STATE=$(gw oauth-start --account-id="$OAUTH_ID" --json | jq -r .authorize_url |
    sed -n 's/.*[?&]state=\([^&]*\).*/\1/p')
gw oauth-callback --account-id="$OAUTH_ID" --code="bench-code#$STATE" >/dev/null
KEY=$(gw add-client-key --name=bench --json | jq -r .key)
[[ $KEY == lgw_* ]] || die "no client key"

"${SERVER[@]}" "$GW" --config "$CFG" server --listen 127.0.0.1:0 \
    >"$WORK/gateway.out" 2>"$WORK/gateway.err" &
GW_PID=$!
PIDS+=("$GW_PID")
GW_URL=http://$(wait_line "$WORK/gateway.out" "listening on" "$GW_PID" | sed 's|.*listening on http://||')
sleep 1
IDLE_RSS_KB=$(status_kb "$GW_PID" VmRSS)

# Each path answers before anything is measured.
ANTHROPIC_BODY=$WORK/anthropic.json
OPENAI_BODY=$WORK/openai.json
# Small, typical bodies; the OpenAI one has a system message, so it is unmistakably OpenAI's.
echo '{"model":"claude-sonnet-4-5","max_tokens":64,"system":"You are terse.","messages":[{"role":"user","content":"Say hello in one short sentence."}]}' >"$ANTHROPIC_BODY"
echo '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in one short sentence."}]}' >"$OPENAI_BODY"
for url in "$MOCK_URL/v1/messages" "$NGINX_URL/v1/messages" "$GW_URL/v1/messages" "$GW_URL/v1/chat/completions"; do
    body=$ANTHROPIC_BODY
    [[ $url == */chat/completions ]] && body=$OPENAI_BODY
    code=$(curl -s -o "$WORK/check.json" -w '%{http_code}' -H "x-api-key: $KEY" \
        -H 'content-type: application/json' --data-binary "@$body" "$url") || true
    [[ $code == 200 ]] || die "$url answered $code: $(cat "$WORK/check.json")"
done

# ---------------------------------------------------------------------------------------------
# JSON: wrk, one thread on the load core.

# run_wrk NAME BASE_URL PATH BODY CONNS SECS PID...  (PIDs: the server whose CPU is counted)
# Figures are named NAME_FIGURE, or NAME_FIGURE_$WRK_SUFFIX when WRK_SUFFIX is set; WRK_REQUESTS
# is left holding the number of requests the run made.
WRK_SUFFIX=
WRK_REQUESTS=0
run_wrk() {
    local name=$1 url=$2 path=$3 body=$4 conns=$5 secs=$6
    shift 6
    local c0 c1 w0 w1 sb0 st0 sb1 st1 out j
    c0=$(ticks "$@")
    read -r sb0 st0 < <(core_jiffies "$SERVER_CPU")
    times >"$WORK/times.0"
    out=$("${LOAD[@]}" wrk -t1 -c"$conns" -d"${secs}s" --timeout 10s --latency -s "$ROOT/bench/wrk.lua" \
        "$url" -- "$path" "$body" "$KEY" 2>&1) || die "wrk failed: $out"
    times >"$WORK/times.1"
    w0=$(children_cpu "$WORK/times.0")
    w1=$(children_cpu "$WORK/times.1")
    c1=$(ticks "$@")
    read -r sb1 st1 < <(core_jiffies "$SERVER_CPU")
    echo "$out" >"$WORK/wrk-$name.txt"
    [[ -n $name ]] || return 0
    j=$(sed -n 's/^WRK //p' <<<"$out")
    [[ -n $j ]] || die "no result from wrk: $out"
    local n us
    n=$(jq .requests <<<"$j")
    us=$(jq .duration_us <<<"$j")
    WRK_REQUESTS=$n
    k() { echo "${name}_$1${WRK_SUFFIX:+_$WRK_SUFFIX}"; }
    put "$(k rps)" "$(calc 0 "$n / ($us / 1e6)")"
    put "$(k p50_ms)" "$(calc 3 "$(jq .p50_us <<<"$j") / 1000")"
    put "$(k p99_ms)" "$(calc 3 "$(jq .p99_us <<<"$j") / 1000")"
    put "$(k errors)" "$(jq '.status_errors + .connect_errors + .read_errors + .write_errors + .timeout_errors' <<<"$j")"
    if ((n > 0)); then
        put "$(k cpu_us_per_req)" "$(calc 1 "($c1 - $c0) / $CLK_TCK * 1e6 / $n")"
    fi
    # wrk's own CPU per second of run (1.00 = its core saturated), and how busy the server core
    # was (the server, the mock, and anything else running there).
    put "$(k wrk_cpu)" "$(calc 2 "($w1 - $w0) / ($us / 1e6)")"
    put "$(k server_core_busy)" "$(calc 2 "($sb1 - $sb0) / ($st1 - $st0 + 0.001)")"
}

json_target() { # TARGET BASE_URL PATH BODY PIDS...
    local target=$1 url=$2 path=$3 body=$4
    shift 4
    log "JSON: $target (warm-up ${WARM_SECS}s, then ${JSON_SECS}s at ${CONNS[*]} connections)"
    run_wrk "" "$url" "$path" "$body" 64 "$WARM_SECS" "$@"
    for c in "${CONNS[@]}"; do
        run_wrk "json_c${c}_$target" "$url" "$path" "$body" "$c" "$JSON_SECS" "$@"
    done
}
if phase json; then
    json_target direct "$MOCK_URL" /v1/messages "$ANTHROPIC_BODY" "$MOCK_PID"
    json_target nginx "$NGINX_URL" /v1/messages "$ANTHROPIC_BODY" $(nginx_pids)
    json_target gateway "$GW_URL" /v1/messages "$ANTHROPIC_BODY" "$GW_PID"
    json_target gateway_openai "$GW_URL" /v1/chat/completions "$OPENAI_BODY" "$GW_PID"

    for c in "${CONNS[@]}"; do
        p=json_c$c
        for t in nginx gateway gateway_openai; do
            put "${p}_${t}_vs_direct_rps" "$(ratio "$(get "${p}_${t}_rps")" "$(get "${p}_direct_rps")")"
            put "${p}_${t}_added_p50_ms" "$(minus "$(get "${p}_${t}_p50_ms")" "$(get "${p}_direct_p50_ms")")"
            put "${p}_${t}_added_p99_ms" "$(minus "$(get "${p}_${t}_p99_ms")" "$(get "${p}_direct_p99_ms")")"
        done
        for t in gateway gateway_openai; do
            put "${p}_${t}_vs_nginx_rps" "$(ratio "$(get "${p}_${t}_rps")" "$(get "${p}_nginx_rps")")"
            put "${p}_${t}_vs_nginx_added_p50" "$(ratio "$(get "${p}_${t}_added_p50_ms")" "$(get "${p}_nginx_added_p50_ms")")"
            put "${p}_${t}_vs_nginx_cpu" "$(ratio "$(get "${p}_${t}_cpu_us_per_req")" "$(get "${p}_nginx_cpu_us_per_req")")"
        done
    done
fi

# ---------------------------------------------------------------------------------------------
# SSE: ssebench on the load core.

ANTHROPIC_SSE='{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"system":"You are terse.","messages":[{"role":"user","content":"Count slowly."}]}'
OPENAI_SSE='{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Count slowly."}]}'

# ssebench URL BODY STREAMS EVENTS INTERVAL_MS [WATCH_PID]: prints its JSON report.
ssebench() {
    local url=$1 body=$2 streams=$3 events=$4 interval=$5 watch=${6:-}
    local args=(--url "$url" --streams "$streams" --body "$body" --session-header
        --header "x-api-key: $KEY" --header "anthropic-version: 2023-06-01"
        --header "x-mock-events: $events" --header "x-mock-interval-ms: $interval"
        --ramp-ms "$SSE_INTERVAL_MS" --timeout-s 60)
    [[ -n $watch ]] && args+=(--watch-pid "$watch")
    "${LOAD[@]}" "$SSEBENCH" "${args[@]}" || die "ssebench failed on $url"
}

# sse_once NAME REP URL BODY STREAMS [WATCH_PID [CPU_PIDS...]]: one measured run into
# $WORK/sse-NAME-REP.json, with the CPU ticks the CPU_PIDS (default WATCH_PID) used. Before the
# first repetition, a warm-up at the same concurrency (3 events per stream, so all of them
# overlap): the gateway's workers and pooled upstream connections then exist, as in steady
# service. The warm-up's TTFB is kept as the cold figure.
sse_once() {
    local name=$1 rep=$2 url=$3 body=$4 streams=$5 watch=${6:-} j c0 c1
    shift 5
    (($# > 0)) && shift
    local cpu_pids=("$@")
    if [[ -n $watch ]] && ((${#cpu_pids[@]} == 0)); then cpu_pids=("$watch"); fi
    if ((rep == 1)); then
        ssebench "$url" "$body" "$streams" 3 "$SSE_INTERVAL_MS" >"$WORK/sse-$name-warmup.json"
        put "${name}_cold_ttfb_p99_ms" "$(jq .ttfb_ms_p99 "$WORK/sse-$name-warmup.json")"
        sleep 0.3
    fi
    c0=$(ticks "${cpu_pids[@]}")
    j=$(ssebench "$url" "$body" "$streams" "$SSE_EVENTS" "$SSE_INTERVAL_MS" "$watch")
    c1=$(ticks "${cpu_pids[@]}")
    jq -c --argjson t $((c1 - c0)) '. + {cpu_ticks: $t}' <<<"$j" >"$WORK/sse-$name-$rep.json"
    local err
    err=$(jq -r '.first_error // empty' <<<"$j")
    [[ -z $err ]] || log "$name (run $rep): $(jq .errors <<<"$j") streams failed; first: $err"
    sleep 0.5 # let the connections close before the next run
}

# sse_report NAME WATCHED: one set of figures from the repetitions: streams and completions
# summed, TTFB and delay percentiles the median over the runs (the delay max the largest),
# peaks the largest, CPU per event over all events (when the runs used at least 20 clock ticks,
# so that the figure means something).
sse_report() {
    local name=$1 watched=$2 a
    a=$(jq -s -c 'def median: sort | .[(length - 1) / 2 | floor];
        { streams: (map(.streams) | add), completed: (map(.completed) | add),
          events: (map(.events) | add), cpu_ticks: (map(.cpu_ticks) | add),
          ttfb: (map(.ttfb_ms_p50 // 1e9) | median), p50: (map(.delay_ms_p50 // 1e9) | median),
          p99: (map(.delay_ms_p99 // 1e9) | median), max: (map(.delay_ms_max // 1e9) | max),
          rss: (map(.peak_rss_kb // 0) | max), threads: (map(.peak_threads // 0) | max) }' \
        "$WORK/sse-$name"-[0-9]*.json)
    put "${name}_streams" "$(jq .streams <<<"$a")"
    put "${name}_completed" "$(jq .completed <<<"$a")"
    put "${name}_ttfb_p50_ms" "$(jq .ttfb <<<"$a")"
    put "${name}_delay_p50_ms" "$(jq .p50 <<<"$a")"
    put "${name}_delay_p99_ms" "$(jq .p99 <<<"$a")"
    put "${name}_delay_max_ms" "$(jq .max <<<"$a")"
    if ((watched)); then
        put "${name}_peak_rss_mb" "$(calc 1 "$(jq .rss <<<"$a") / 1024")"
        put "${name}_peak_threads" "$(jq .threads <<<"$a")"
        local events ticks_
        events=$(jq .events <<<"$a")
        ticks_=$(jq .cpu_ticks <<<"$a")
        if ((events > 0 && ticks_ >= 20)); then
            put "${name}_cpu_us_per_event" "$(calc 1 "$ticks_ / $CLK_TCK * 1e6 / $events")"
        fi
    fi
}

# Repetitions interleave the paths, so that other work on the machine hits all of them alike.
if phase sse; then
    for c in "${SSE_LEVELS[@]}"; do
        log "SSE: $c streams x $SSE_EVENTS events, ${SSE_INTERVAL_MS} ms apart, $SSE_REPS run(s) per path"
        p=sse_c$c
        for rep in $(seq "$SSE_REPS"); do
            sse_once "${p}_direct" "$rep" "$MOCK_URL/v1/messages" "$ANTHROPIC_SSE" "$c"
            sse_once "${p}_nginx" "$rep" "$NGINX_URL/v1/messages" "$ANTHROPIC_SSE" "$c" "$NGINX_WORKER" $(nginx_pids)
            sse_once "${p}_gateway" "$rep" "$GW_URL/v1/messages" "$ANTHROPIC_SSE" "$c" "$GW_PID"
            sse_once "${p}_gateway_openai" "$rep" "$GW_URL/v1/chat/completions" "$OPENAI_SSE" "$c" "$GW_PID"
        done
        sse_report "${p}_direct" 0
        for t in nginx gateway gateway_openai; do sse_report "${p}_$t" 1; done
        for t in nginx gateway gateway_openai; do
            for q in p50 p99 max; do
                put "${p}_${t}_added_${q}_ms" "$(minus "$(get "${p}_${t}_delay_${q}_ms")" "$(get "${p}_direct_delay_${q}_ms")")"
            done
        done
        for t in gateway gateway_openai; do
            put "${p}_${t}_p99_minus_nginx_ms" "$(minus "$(get "${p}_${t}_delay_p99_ms")" "$(get "${p}_nginx_delay_p99_ms")")"
        done
    done
fi

# ---------------------------------------------------------------------------------------------
# Footprint: idle RSS, binary sizes, CLI start-up.

if phase footprint; then
    log "footprint and CLI start-up"
    put gateway_idle_rss_mb "$(calc 1 "$IDLE_RSS_KB / 1024")"
    put release_binary_mb "$(calc 2 "$(stat -c %s "$GW_RELEASE") / 1048576")"
    if [[ -x $STATIC ]]; then
        put static_binary_mb "$(calc 2 "$(stat -c %s "$STATIC") / 1048576")"
    fi
    CLI_RUNS=20
    if command -v hyperfine >/dev/null; then
        hyperfine -N --style none --warmup 3 --runs "$CLI_RUNS" --export-json "$WORK/cli.json" \
            "$GW --config $CFG list-accounts" >/dev/null 2>&1
        put cli_list_accounts_ms "$(calc 2 "$(jq '.results[0].mean' "$WORK/cli.json") * 1000")"
    else
        t0=$(date +%s%N)
        for _ in $(seq "$CLI_RUNS"); do gw list-accounts >/dev/null; done
        put cli_list_accounts_ms "$(calc 2 "($(date +%s%N) - $t0) / $CLI_RUNS / 1e6")"
    fi
fi

# ---------------------------------------------------------------------------------------------
# Scale: several gateway instances sharing state through Redis, behind nginx as a load balancer.
#
# Setups, each measured with JSON requests (wrk, the same body and 64 sessions) at 16 and 64
# connections:
#   local      one instance, state.backend local (no `state:` section), clients straight to it:
#              the single-instance baseline;
#   1x         one instance, state.backend redis, behind nginx (an upstream block of one);
#   3x         three instances, state.backend redis, behind the same nginx (three servers);
#   1x_spread, 3x_spread: the same as 1x and 3x with nothing pinned: wrk, nginx, Redis, the
#              instances and the mock may use both cores.
# Every instance runs from its own directory: a copy of the bench's config.yaml (4 API-key
# accounts, 1 OAuth account, sticky on, usage ledger on, access log to a file) with a `state:`
# section added, a copy of its gateway.key (the AES key that seals the secrets: every instance
# needs the same one), its own usage ledger and access log. Each setup has its own key prefix
# in the one Redis, so no setup starts with another's pins, counters or tokens.
#
# NOTE: this 2-core machine cannot show real scale-out. Pinned, nginx, Redis, the mock and every
# instance share core 1, so three instances have no more CPU than one; unpinned, they share the
# same two cores with wrk. What 3x/1x measures here is the cost of the shared state (the Redis
# round trips and Redis' own CPU, the extra processes) at the same CPU, not the gain of more
# machines: on separate hosts each instance brings its own cores, and the limit becomes Redis
# (see its CPU per request) and the load balancer.

if phase scale; then
    SCALE_SECS=8 SCALE_WARM=2
    ((QUICK)) && SCALE_SECS=3 SCALE_WARM=1
    SCALE_CONNS=(16 64)
    SCALE_DIR=$WORK/scale
    mkdir -p "$SCALE_DIR"
    log "scale: Redis, instances with state.backend $SCALE_BACKEND behind nginx (${SCALE_SECS}s per row)"

    # stop PID...: ends processes this script started and forgets them.
    stop() {
        local p q keep=()
        for p in "$@"; do kill "$p" 2>/dev/null || true; done
        for p in "$@"; do wait "$p" 2>/dev/null || true; done
        for q in "${PIDS[@]}"; do [[ " $* " == *" $q "* ]] || keep+=("$q"); done
        PIDS=("${keep[@]}")
    }
    # repin CPUS PID...: sets the CPU affinity of every thread of running processes.
    repin() {
        local cpus=$1 p
        shift
        for p in "$@"; do
            taskset -a -p -c "$cpus" "$p" >/dev/null 2>&1 || log "could not set the CPUs of process $p to $cpus"
        done
    }

    # One Redis for every setup: no persistence, on a free port, a server like the others.
    REDIS_PORT=$("$MOCK" --free-port)
    mkdir -p "$SCALE_DIR/redis"
    "${SERVER[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$SCALE_DIR/redis" >"$SCALE_DIR/redis.out" 2>"$SCALE_DIR/redis.err" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    wait_port "$REDIS_PORT"
    rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
    [[ $(rcli ping) == PONG ]] || die "redis-server on port $REDIS_PORT does not answer PING"
    # Commands Redis has executed (commandstats, less our own INFO; commands a Lua script runs
    # count as well as the script's EVAL/EVALSHA).
    redis_calls() {
        rcli info commandstats | tr -d '\r' |
            awk -F'[:,=]' '/^cmdstat_/ && $1 != "cmdstat_info" { s += $3 } END { print s + 0 }'
    }

    # scale_setup LABEL INSTANCES BACKEND VIA PINNED: VIA is lb or direct; PINNED 1 or 0.
    scale_setup() {
        local label=$1 n=$2 backend=$3 via=$4 pinned=$5
        local pin=() load=("${LOAD[@]}") all_cpus="0-$(($(nproc) - 1))"
        ((pinned)) && pin=("${SERVER[@]}")
        ((pinned)) || load=()
        log "scale $label: $n instance(s), state.backend $backend, $([[ $via == lb ]] && echo "behind nginx" || echo direct), $( ((pinned)) && echo "servers on core $SERVER_CPU, wrk on core $LOAD_CPU" || echo "nothing pinned")"
        if ((!pinned)) && ((${#SERVER[@]} > 0)); then repin "$all_cpus" "$MOCK_PID" "$REDIS_PID"; fi

        local i dir pids=() addrs=() pid
        for i in $(seq "$n"); do
            dir=$SCALE_DIR/$label-$i
            mkdir -p "$dir"
            {
                if [[ $backend == redis ]]; then
                    cat <<EOF
state:
  backend: redis
  redis_url: redis://127.0.0.1:$REDIS_PORT/0
  prefix: llm-gateway-bench-$label
  timeout: 250ms
EOF
                fi
                cat "$CFG"
            } >"$dir/config.yaml"
            chmod 600 "$dir/config.yaml"
            cp -p "$(dirname "$CFG")/gateway.key" "$dir/gateway.key"
            "${pin[@]}" "$GW" --config "$dir/config.yaml" server --listen 127.0.0.1:0 \
                >"$dir/gateway.out" 2>"$dir/gateway.err" &
            pid=$!
            PIDS+=("$pid")
            pids+=("$pid")
            addrs+=("$(wait_line "$dir/gateway.out" "listening on" "$pid" | sed 's|.*listening on http://||')")
        done

        local url=http://${addrs[0]} lb_pid='' lb_port conf
        if [[ $via == lb ]]; then
            lb_port=$("$MOCK" --free-port)
            conf=$SCALE_DIR/nginx-$label
            start_nginx pin "$conf" "$lb_port" "${addrs[@]}"
            lb_pid=$NGINX_STARTED
            url=http://127.0.0.1:$lb_port
        fi
        # Every instance answers (nginx takes them in turn).
        local code
        for i in $(seq $((2 * n))); do
            code=$(curl -s -o "$SCALE_DIR/check.json" -w '%{http_code}' -H "x-api-key: $KEY" \
                -H 'content-type: application/json' --data-binary "@$ANTHROPIC_BODY" "$url/v1/messages") || true
            [[ $code == 200 ]] || die "scale $label: $url answered $code: $(cat "$SCALE_DIR/check.json")"
        done
        # The CPU counted per request: the instances, nginx (master and worker) and Redis.
        local cpu_pids=("${pids[@]}") workers=()
        if [[ -n $lb_pid ]]; then
            mapfile -t workers < <(pgrep -P "$lb_pid" || true)
            cpu_pids+=("$lb_pid" "${workers[@]}")
        fi
        [[ $backend == redis ]] && cpu_pids+=("$REDIS_PID")

        local saved_load=("${LOAD[@]}") c calls0 calls1 r0 r1 k0 k1
        LOAD=("${load[@]}")
        run_wrk "" "$url" /v1/messages "$ANTHROPIC_BODY" 64 "$SCALE_WARM" "${cpu_pids[@]}"
        WRK_SUFFIX=$label
        for c in "${SCALE_CONNS[@]}"; do
            calls0=$(redis_calls)
            r0=$(ticks "$REDIS_PID")
            run_wrk "scale_json_c$c" "$url" /v1/messages "$ANTHROPIC_BODY" "$c" "$SCALE_SECS" "${cpu_pids[@]}"
            r1=$(ticks "$REDIS_PID")
            calls1=$(redis_calls)
            # The baseline never talks to Redis.
            [[ $label == local ]] && continue
            put "scale_json_c${c}_redis_cpu_s_$label" "$(calc 2 "($r1 - $r0) / $CLK_TCK")"
            if ((WRK_REQUESTS > 0)); then
                put "scale_json_c${c}_redis_cpu_us_per_req_$label" "$(calc 1 "($r1 - $r0) / $CLK_TCK * 1e6 / $WRK_REQUESTS")"
                put "scale_json_c${c}_redis_calls_per_req_$label" "$(calc 2 "($calls1 - $calls0) / $WRK_REQUESTS")"
            fi
        done
        WRK_SUFFIX=
        LOAD=("${saved_load[@]}")

        if [[ $backend == redis ]]; then
            k0=$(rcli --scan --pattern "llm-gateway-bench-$label:*" | wc -l)
            put "scale_redis_keys_$label" "$k0"
            ((k0 > 0)) || log "scale $label: no key under llm-gateway-bench-$label in Redis: is the state shared?"
        fi
        for i in $(seq "$n"); do
            k1=$(grep -ci 'warn\|error' "$SCALE_DIR/$label-$i/gateway.err" || true)
            ((k1 == 0)) || log "scale $label: instance $i logged $k1 warning/error line(s), first: $(grep -im1 'warn\|error' "$SCALE_DIR/$label-$i/gateway.err")"
        done
        # nginx first: its idle keep-alive connections close, so the instances stop at once.
        [[ -n $lb_pid ]] && stop "$lb_pid"
        stop "${pids[@]}"
        if ((!pinned)) && ((${#SERVER[@]} > 0)); then repin "$SERVER_CPU" "$MOCK_PID" "$REDIS_PID"; fi
    }

    SCALE_START=$(date +%s)
    scale_setup local 1 local direct 1
    scale_setup 1x 1 "$SCALE_BACKEND" lb 1
    scale_setup 3x 3 "$SCALE_BACKEND" lb 1
    scale_setup 1x_spread 1 "$SCALE_BACKEND" lb 0
    scale_setup 3x_spread 3 "$SCALE_BACKEND" lb 0
    stop "$REDIS_PID"
    for c in "${SCALE_CONNS[@]}"; do
        p=scale_json_c$c
        put "${p}_ratio_3x_1x" "$(ratio "$(get "${p}_rps_3x")" "$(get "${p}_rps_1x")")"
        put "${p}_ratio_3x_spread_1x_spread" "$(ratio "$(get "${p}_rps_3x_spread")" "$(get "${p}_rps_1x_spread")")"
        for t in 1x 3x 1x_spread 3x_spread; do
            put "${p}_ratio_${t}_local" "$(ratio "$(get "${p}_rps_$t")" "$(get "${p}_rps_local")")"
        done
    done
    put scale_elapsed_s $(($(date +%s) - SCALE_START))
fi
ELAPSED=$(($(date +%s) - START))
put bench_elapsed_s "$ELAPSED"
put loadavg_start "$LOADAVG_START"
put loadavg_end "$(cut -d' ' -f1 /proc/loadavg)"

# ---------------------------------------------------------------------------------------------
# Targets: PASS or MISS, never a failure of the run.

TARGETS=()
target() { # DESCRIPTION MEASURED RESULT
    TARGETS+=("$1|$2|$3")
}
check() { # DESCRIPTION MEASURED EXPR VALUES...: n/a when a figure is missing (something broke)
    local desc=$1 measured=$2 expr=$3 v
    shift 3
    for v in "$@"; do isnum "$v" || {
        target "$desc" "$measured" n/a
        return
    }; done
    if holds "$expr" "$@"; then target "$desc" "$measured" PASS; else target "$desc" "$measured" MISS; fi
}
if phase json; then
    g16=$(get json_c16_gateway_vs_nginx_rps)
    check "JSON at 16 connections: gateway req/s >= 0.8x nginx" "${g16}x" "$g16 >= 0.8" "$g16"
    ga=$(get json_c16_gateway_added_p50_ms) na=$(get json_c16_nginx_added_p50_ms)
    check "JSON at 16 connections: added p50 <= 1.5x nginx's" "$ga ms vs nginx $na ms" \
        "$ga <= 1.5 * $na" "$ga" "$na"
fi
if phase sse; then
    if [[ " ${SSE_LEVELS[*]} " == *" 1000 "* ]]; then
        done_=$(get sse_c1000_gateway_completed) done_o=$(get sse_c1000_gateway_openai_completed)
        all=$(get sse_c1000_gateway_streams)
        check "SSE 1000 streams: every stream completes" \
            "$done_/$all Anthropic, $done_o/$all OpenAI ($SSE_REPS runs)" "$done_ == $all && $done_o == $all" \
            "$done_" "$done_o" "$all"
        gp=$(get sse_c1000_gateway_delay_p99_ms) np=$(get sse_c1000_nginx_delay_p99_ms)
        check "SSE 1000 streams: p99 per-event delay <= nginx's + 0.5 ms" "$gp ms vs nginx $np ms" \
            "$gp <= $np + 0.5" "$gp" "$np"
        rss=$(get sse_c1000_gateway_peak_rss_mb)
        check "SSE 1000 streams in <= 64 MB RSS" "$rss MB" "$rss <= 64" "$rss"
    else
        for d in "SSE 1000 streams: every stream completes" "SSE 1000 streams: p99 per-event delay <= nginx's + 0.5 ms" \
            "SSE 1000 streams in <= 64 MB RSS"; do
            target "$d" "not measured (QUICK)" SKIP
        done
    fi
fi
if phase footprint; then
    idle=$(get gateway_idle_rss_mb)
    check "idle RSS <= 10 MB" "$idle MB" "$idle <= 10" "$idle"
    cli=$(get cli_list_accounts_ms)
    check "CLI start-up (list-accounts) < 10 ms" "$cli ms" "$cli < 10" "$cli"
    st=$(get static_binary_mb)
    if isnum "$st"; then
        check "static binary < 10 MB" "$st MB" "$st < 10" "$st"
    else
        target "static binary < 10 MB" "not built (QUICK; make static)" SKIP
    fi
fi

# ---------------------------------------------------------------------------------------------
# Results: bench/results.txt, bench/results.md, README's Performance section.

cell() { local v=${R[$1]:-}; echo "${v:-–}"; }
{
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.0f GB", $2 / 1048576 }' /proc/meminfo)
    kind="full run"
    ((QUICK)) && kind="QUICK run: shorter, no 1000-stream level"
    [[ -n $ONLY ]] && kind="$kind, only $ONLY"
    echo "Measured by \`make bench\` on $(date -u +%Y-%m-%d) ($kind, ${ELAPSED} s): $cpu, $(nproc) cores, $mem, Linux $(uname -r);"
    echo "1-minute load average before the run: $(get loadavg_start) (above 0: other work shared the cores; during the run the bench's own threads raise it)."
    echo "Load generators (wrk $(wrk -v 2>&1 | awk 'NR == 1 { sub(/^debian\//, "", $2); print $2 }'), examples/ssebench.rs) on core $LOAD_CPU; the server under test and the mock upstream"
    echo "(examples/mock_upstream.rs) on core $SERVER_CPU. Absolute times are this machine's; the ratios travel better."
    echo "The gateway runs a team config: 4 API-key accounts and 1 OAuth account (system prompt injected), sticky"
    echo "sessions on (64 sessions), usage ledger on, access log to a file. nginx $("$NGINX" -v 2>&1 | sed 's|.*nginx/||'): one worker,"
    echo "\`proxy_buffering off\`, upstream keep-alive 64. *Added* = minus the direct figure (client to mock, no proxy)."
    echo
    if phase json; then
        echo "**JSON** (wrk, ${JSON_SECS} s per row; \`POST /v1/messages\`, and \`POST /v1/chat/completions\` through the OpenAI converter):"
        echo
        echo "| conns | path | req/s | vs direct | vs nginx | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU µs/req |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        for c in "${CONNS[@]}"; do
            for t in direct nginx gateway gateway_openai; do
                p=json_c${c}_$t
                label=${t/gateway_openai/gateway (OpenAI)}
                echo "| $c | $label | $(cell "${p}_rps") | $(cell "${p}_vs_direct_rps") | $(cell "${p}_vs_nginx_rps") | $(cell "${p}_p50_ms") | $(cell "${p}_p99_ms") | $(cell "${p}_added_p50_ms") | $(cell "${p}_added_p99_ms") | $(cell "${p}_cpu_us_per_req") |"
            done
        done
        echo
        pct() { if isnum "$1"; then calc 0 "$1 * 100"; else echo "?"; fi; }
        echo "wrk is not what limits the proxies: at 16 connections it drives direct to $(cell json_c16_direct_rps) req/s ($(ratio "$(get json_c16_direct_rps)" "$(get json_c16_nginx_rps)")x nginx, $(ratio "$(get json_c16_direct_rps)" "$(get json_c16_gateway_rps)")x the gateway),"
        echo "and against nginx and the gateway it uses $(pct "$(get json_c16_nginx_wrk_cpu)")% and $(pct "$(get json_c16_gateway_wrk_cpu)")% of its core while the server core is $(pct "$(get json_c16_nginx_server_core_busy)")% and $(pct "$(get json_c16_gateway_server_core_busy)")% busy."
        echo
    fi
    if phase sse; then
        echo "**SSE** (ssebench; $SSE_EVENTS events ${SSE_INTERVAL_MS} ms apart per stream, stream starts spread over ${SSE_INTERVAL_MS} ms, after a warm-up at the same"
        echo "concurrency; delay = arrival at the client minus the send time the mock embeds in each event. $SSE_REPS run(s) per row, interleaved across"
        echo "the paths: completed counts every run, TTFB and delay percentiles are the median run's, max and peaks the largest. Peak RSS and"
        echo "threads: the gateway process, or nginx's worker):"
        echo
        echo "| streams | path | completed | TTFB p50 ms | delay p50 ms | delay p99 ms | delay max ms | added p99 ms | peak RSS MB | threads | CPU µs/event |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for c in "${SSE_LEVELS[@]}"; do
            for t in direct nginx gateway gateway_openai; do
                p=sse_c${c}_$t
                label=${t/gateway_openai/gateway (OpenAI)}
                echo "| $c | $label | $(cell "${p}_completed")/$(cell "${p}_streams") | $(cell "${p}_ttfb_p50_ms") | $(cell "${p}_delay_p50_ms") | $(cell "${p}_delay_p99_ms") | $(cell "${p}_delay_max_ms") | $(cell "${p}_added_p99_ms") | $(cell "${p}_peak_rss_mb") | $(cell "${p}_peak_threads") | $(cell "${p}_cpu_us_per_event") |"
            done
        done
        echo
    fi
    if phase footprint; then
        echo "**Footprint**: idle RSS $(cell gateway_idle_rss_mb) MB (fresh gateway); release binary $(cell release_binary_mb) MB; static (musl) binary $(cell static_binary_mb) MB; CLI start-up (\`list-accounts\`, mean of $CLI_RUNS) $(cell cli_list_accounts_ms) ms."
        echo
    fi
    if phase scale; then
        echo "**Scaling out** (wrk, ${SCALE_SECS} s per row, \`POST /v1/messages\`, same config and sessions as above; one Redis"
        echo "$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), no persistence; nginx as the load balancer: one worker, round robin, keep-alive 64)."
        if [[ $SCALE_BACKEND == redis ]]; then
            echo "*local*: one instance, \`state.backend: local\`, no nginx; the others run \`state.backend: redis\` behind nginx."
        else
            echo "**SCALE_BACKEND=local**: every instance keeps local state (nothing shared): a check of the setup, not the cost of shared state."
        fi
        echo "*pinned*: wrk on core $LOAD_CPU, nginx, Redis, the mock and the instances on core $SERVER_CPU; *spread*: nothing pinned. CPU µs/req: the instances,"
        echo "nginx and Redis. Redis cmds/req: commands Redis ran (commandstats; a Lua script's commands count too) per request."
        echo "**This $(nproc)-core machine cannot show real scale-out**: the instances share the same cores, so 3 vs 1 instance is the cost"
        echo "of the shared state at equal CPU, not the gain of more machines (each of which would bring its own cores)."
        echo
        echo "| conns | setup | req/s | vs local | vs 1 instance | p50 ms | p99 ms | errors | CPU µs/req | Redis CPU s | Redis µs/req | Redis cmds/req |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for c in "${SCALE_CONNS[@]}"; do
            p=scale_json_c$c
            for t in local 1x 3x 1x_spread 3x_spread; do
                case $t in
                    local) label="1 instance, local state, direct, pinned" ;;
                    1x) label="1 instance + nginx, pinned" ;;
                    3x) label="3 instances + nginx, pinned" ;;
                    1x_spread) label="1 instance + nginx, spread" ;;
                    3x_spread) label="3 instances + nginx, spread" ;;
                esac
                vs1=
                [[ $t == 3x ]] && vs1=$(cell "${p}_ratio_3x_1x")
                [[ $t == 3x_spread ]] && vs1=$(cell "${p}_ratio_3x_spread_1x_spread")
                echo "| $c | $label | $(cell "${p}_rps_$t") | $(cell "${p}_ratio_${t}_local") | ${vs1:-–} | $(cell "${p}_p50_ms_$t") | $(cell "${p}_p99_ms_$t") | $(cell "${p}_errors_$t") | $(cell "${p}_cpu_us_per_req_$t") | $(cell "${p}_redis_cpu_s_$t") | $(cell "${p}_redis_cpu_us_per_req_$t") | $(cell "${p}_redis_calls_per_req_$t") |"
            done
        done
        echo
    fi
    if ((${#TARGETS[@]} > 0)); then
        echo "**Targets**:"
        echo
        echo "| target | measured | |"
        echo "|---|---|---|"
        for t in "${TARGETS[@]}"; do
            IFS='|' read -r d m r <<<"$t"
            echo "| $d | $m | $r |"
        done
    fi
} >"$WORK/results.md"

# A partial run (ONLY=...) leaves the results files and README as they were.
if [[ -z $ONLY ]]; then
    for n in "${NAMES[@]}"; do printf '%s %s\n' "$n" "${R[$n]}"; done >"$ROOT/bench/results.txt"
    cp "$WORK/results.md" "$ROOT/bench/results.md"
fi

# README: replace what lies between the markers; add the section before Development if absent.
# Only a full run does: a QUICK run's figures are not what README should quote.
README=$ROOT/README.md
FULL=1
if ((QUICK)) || [[ -n $ONLY ]]; then FULL=0; fi
if ((!FULL)); then
    :
elif ! grep -q '<!-- bench:start -->' "$README"; then
    section=$(printf '%s\n' "## Performance" "" \
        "\`make bench\` reproduces these figures (\`make bench QUICK=1\` for a short run); it writes \`bench/results.md\`," \
        "from which this section is generated." "" "<!-- bench:start -->" "<!-- bench:end -->" "")
    if grep -q '^## Development' "$README"; then
        awk -v s="$section" '/^## Development/ && !done { print s; print ""; done = 1 } { print }' "$README" >"$WORK/README.md"
    else
        { cat "$README"; echo; echo "$section"; } >"$WORK/README.md"
    fi
    cat "$WORK/README.md" >"$README"
fi
((!FULL)) || awk -v f="$WORK/results.md" '
    /<!-- bench:end -->/ { while ((getline l < f) > 0) print l; skip = 0 }
    !skip { print }
    /<!-- bench:start -->/ { skip = 1 }
' "$README" >"$WORK/README.md"
((!FULL)) || cat "$WORK/README.md" >"$README"

echo
cat "$WORK/results.md"
if ((${#TARGETS[@]} > 0)); then
    echo
    for t in "${TARGETS[@]}"; do
        IFS='|' read -r d m r <<<"$t"
        printf '%-5s %s: %s\n' "$r" "$d" "$m"
    done
fi
echo
if [[ -n $ONLY ]]; then
    echo "bench: ${ELAPSED}s after the build; partial run (ONLY=$ONLY): bench/results.* and README.md left as they were"
elif ((QUICK)); then
    echo "bench: ${ELAPSED}s after the build; results in bench/results.txt and bench/results.md (README.md only after a full run)"
else
    echo "bench: ${ELAPSED}s after the build; results in bench/results.txt, bench/results.md and README.md"
fi
