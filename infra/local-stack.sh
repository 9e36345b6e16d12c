#!/usr/bin/env bash
# The local multi-user stack, in the background, in one folder:
#   PostgreSQL (databases prefect, mlflow, mlflow_auth; 127.0.0.1 only, password auth)
#   Prefect server on PostgreSQL, MLflow tracking server + registry on PostgreSQL
#   the Prefect process work pool `amed-local` (and, with --worker, a worker for it)
#   storage on disk under the stack folder: the store (teacher shards, checkpoints, results) in store/, MLflow's
#   artifacts in mlflow/artifacts/ (served by the MLflow server), so `down` and `up` lose nothing; or S3 (below)
#
#   infra/local-stack.sh up [--worker]    start what is not running, wait until each answers, print the URLs
#   infra/local-stack.sh status           each service up/down (exit 0 when all that were started answer)
#   infra/local-stack.sh env              export lines for a client shell:  eval "$(infra/local-stack.sh env)"
#                                         (exit 1 and no exports while Prefect or MLflow is not running)
#   infra/local-stack.sh down             stop everything `up` started (idempotent); data stays in the folder
#
# A failed `up` stops what it started itself, prints one line naming the log, and exits non-zero.
# Settings (environment; `up` records what it used in $AMED_STACK_DIR/stack.env, and status/env/down, and an
# `up` while any service still runs, read that record rather than the environment):
#   AMED_STACK_DIR      folder for data, logs, PIDs, generated secrets   (default: <repo>/amed-runs/stack)
#   AMED_STACK_HOST     address Prefect and MLflow bind                  (default: 127.0.0.1; PostgreSQL and
#                       moto always stay on 127.0.0.1)
#   AMED_STACK_AUTH     1: Prefect API auth string + MLflow basic-auth   (default: 1 when AMED_STACK_HOST is not
#                       loopback, else 0; it cannot be turned off for a non-loopback host)
#   AMED_PREFECT_PORT=4300  AMED_MLFLOW_PORT=5300  AMED_PG_PORT=5433  AMED_S3_PORT=5400
#   AMED_PREFECT_UI_API_URL  the API URL the Prefect UI's pages call (default: the stack's own, http://HOST:PORT/api;
#                       set it when browsers reach the server by another address, e.g. through an ingress)
#   AMED_WORK_POOL      Prefect work pool (default: amed-local, as in infra/prefect.yaml)
#   AMED_STACK_S3       none (default): no S3; moto: an S3-protocol server (moto, in memory: its objects are lost
#                       at `down`; needs pip install -e '.[local-s3]') for the store
#   AMED_S3_ENDPOINT    an S3 of yours for the store (credentials from the usual AWS_* variables); no moto then
#   AMED_S3_BUCKET      the bucket of the store on S3 (default: amed-distill)
#   AMED_STORE_URL      store URL handed to clients (default: $AMED_STACK_DIR/store, or s3://$AMED_S3_BUCKET/store
#                       with S3)
#   AMED_MLFLOW_ARTIFACTS  MLflow's --artifacts-destination (default: $AMED_STACK_DIR/mlflow/artifacts, served to
#                       clients by the MLflow server; e.g. s3://BUCKET/mlflow with AMED_S3_ENDPOINT)
#   AMED_MLFLOW_WORKERS MLflow server worker processes (default: 2)
#   AMED_MLFLOW_ALLOWED_HOSTS  passed to `mlflow server --allowed-hosts` when set (exposed servers)
#   AMED_STACK_TIMEOUT  seconds to wait for each service (default: 180)
# Secrets (never printed, never logged; each one, when unset, is generated once into a 0600 file under
# $AMED_STACK_DIR/secrets/; a value set in the environment is used as is and not written anywhere):
#   AMED_PG_PASSWORD            password of the PostgreSQL role `amed` (set again on every `up`)
#   AMED_PREFECT_AUTH_STRING    Prefect API auth string "user:password" (clients: PREFECT_API_AUTH_STRING)
#   AMED_MLFLOW_ADMIN_USER      MLflow basic-auth admin (default: admin; clients: MLFLOW_TRACKING_USERNAME)
#   AMED_MLFLOW_ADMIN_PASSWORD  its password; only used when the admin is first created (clients:
#                               MLFLOW_TRACKING_PASSWORD); change it later through MLflow's API
#   AMED_MLFLOW_SECRET_KEY      MLflow's Flask secret key (CSRF)
# Needs: PostgreSQL server binaries (Debian `postgresql`, installed here by apt-get when missing and run as
# root), and in the Python environment what `pip install -e .` installs (prefect with asyncpg, mlflow,
# psycopg2-binary, Flask-WTF for auth); moto[server] only with AMED_STACK_S3=moto. Tools are taken from
# <repo>/.venv/bin when it exists, else from PATH (AMED_BIN overrides).
set -euo pipefail
umask 022

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="infra/local-stack.sh"

# one line on stderr and exit 1; during `up`, the EXIT trap (on_up_exit) then stops what this `up` started
die() { echo "$PROG: error: $*$(up_cleanup_note)" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

STACK="${AMED_STACK_DIR:-$ROOT/amed-runs/stack}"
case "$STACK" in /*) ;; *) STACK="$PWD/$STACK" ;; esac
[[ "$STACK" =~ ^[A-Za-z0-9._/+@,=\ -]+$ ]] || die "AMED_STACK_DIR may hold letters, digits, spaces and ._/+@,=- only: '$STACK'"
STATE="$STACK/stack.env"
LOGS="$STACK/logs"
RUN="$STACK/run"
SECRETS="$STACK/secrets"
SERVICES=(postgres s3 prefect mlflow worker)

# ---------------------------------------------------------------- tools
find_bin() {
  if [ -n "${AMED_BIN:-}" ]; then BIN="$AMED_BIN"
  elif [ -x "$ROOT/.venv/bin/prefect" ]; then BIN="$ROOT/.venv/bin"
  else BIN="$(dirname "$(command -v prefect || echo /nonexistent/prefect)")"
  fi
  PY="$BIN/python"
  [ -x "$PY" ] || PY="$(command -v python3 || true)"
  for tool in prefect mlflow; do
    [ -x "$BIN/$tool" ] || die "$tool not found in $BIN (install the project: pip install -e '.[test]', or set AMED_BIN)"
  done
}

find_pg() {
  PG_BIN="${AMED_PG_BIN:-}"
  if [ -z "$PG_BIN" ]; then
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ]
}

install_pg() {
  find_pg && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "$PROG: error: PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin, AMED_PG_BIN);" \
         "install Debian's package as root: apt-get update && apt-get install -y postgresql" >&2
    exit 3
  fi
  note "installing Debian's postgresql package (log: $LOGS/apt.log) ..."
  {
    if ! apt-cache policy postgresql 2>/dev/null | grep -q 'Candidate: [0-9]'; then apt-get update; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
  } >>"$LOGS/apt.log" 2>&1 || { echo "$PROG: error: apt-get install postgresql failed; see $LOGS/apt.log" >&2; exit 3; }
  find_pg || { echo "$PROG: error: postgresql installed but no initdb under /usr/lib/postgresql/*/bin" >&2; exit 3; }
}

# PostgreSQL refuses to run as root: as root it runs as the `postgres` user the Debian package creates.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    local runuser
    runuser="$(PATH="$PATH:/usr/sbin:/sbin" command -v runuser)" || die "runuser (util-linux) not found"
    env -i PATH="$PG_BIN:/usr/bin:/bin" LC_ALL=C LANG=C "$runuser" -u "$PG_OSUSER" -- "$@"
  else
    env -i PATH="$PG_BIN:/usr/bin:/bin" LC_ALL=C LANG=C HOME="${HOME:-/}" "$@"
  fi
}

# ---------------------------------------------------------------- settings
is_loopback() { case "$1" in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac; }

fresh_settings() {
  HOST="${AMED_STACK_HOST:-127.0.0.1}"
  if is_loopback "$HOST"; then AUTH="${AMED_STACK_AUTH:-0}"
  else
    AUTH=1
    [ "${AMED_STACK_AUTH:-1}" = 1 ] || die "AMED_STACK_AUTH=${AMED_STACK_AUTH} refused: host $HOST is not loopback, auth stays on"
  fi
  case "$AUTH" in 0|1) ;; *) die "AMED_STACK_AUTH must be 0 or 1, not '$AUTH'" ;; esac
  PREFECT_PORT="${AMED_PREFECT_PORT:-4300}"
  MLFLOW_PORT="${AMED_MLFLOW_PORT:-5300}"
  PG_PORT="${AMED_PG_PORT:-5433}"
  S3_PORT="${AMED_S3_PORT:-5400}"
  POOL="${AMED_WORK_POOL:-amed-local}"
  BUCKET="${AMED_S3_BUCKET:-amed-distill}"
  S3_EXTERNAL="${AMED_S3_ENDPOINT:-}"
  S3_MODE="${AMED_STACK_S3:-none}"
  [ -n "$S3_EXTERNAL" ] && S3_MODE=external
  case "$S3_MODE" in
    none) S3_ENDPOINT="" ;;
    moto) S3_ENDPOINT="http://127.0.0.1:$S3_PORT" ;;
    external) S3_ENDPOINT="$S3_EXTERNAL" ;;
    *) die "AMED_STACK_S3 must be none (the default: the store on disk) or moto, not '$S3_MODE'" ;;
  esac
  # on disk under the stack folder by default: `down` and `up` keep the store and MLflow's artifacts
  if [ "$S3_MODE" = none ]; then STORE_URL="${AMED_STORE_URL:-$STACK/store}"; else STORE_URL="${AMED_STORE_URL:-s3://$BUCKET/store}"; fi
  MLFLOW_ARTIFACTS="${AMED_MLFLOW_ARTIFACTS:-$STACK/mlflow/artifacts}"
  if [ "$S3_MODE" = none ] && [[ "$STORE_URL$MLFLOW_ARTIFACTS" == *s3://* ]]; then
    die "AMED_STORE_URL / AMED_MLFLOW_ARTIFACTS name s3:// but the stack has no S3: set AMED_S3_ENDPOINT (yours) or AMED_STACK_S3=moto"
  fi
  PREFECT_UI_API="${AMED_PREFECT_UI_API_URL:-}"
  MLFLOW_WORKERS="${AMED_MLFLOW_WORKERS:-2}"
  MLFLOW_ALLOWED_HOSTS="${AMED_MLFLOW_ALLOWED_HOSTS:-}"
  MLFLOW_ADMIN_USER="${AMED_MLFLOW_ADMIN_USER:-admin}"
  # where each secret comes from: env (the variable named) or file (generated under secrets/)
  SRC_PG="file"; [ -n "${AMED_PG_PASSWORD:-}" ] && SRC_PG="env"
  SRC_PREFECT="file"; [ -n "${AMED_PREFECT_AUTH_STRING:-}" ] && SRC_PREFECT="env"
  SRC_MLFLOW="file"; [ -n "${AMED_MLFLOW_ADMIN_PASSWORD:-}" ] && SRC_MLFLOW="env"
  SRC_FLASK="file"; [ -n "${AMED_MLFLOW_SECRET_KEY:-}" ] && SRC_FLASK="env"
  for p in "$PREFECT_PORT" "$MLFLOW_PORT" "$PG_PORT" "$S3_PORT" "$MLFLOW_WORKERS"; do
    [[ "$p" =~ ^[0-9]+$ ]] || die "ports and AMED_MLFLOW_WORKERS must be numbers, got '$p'"
  done
}

STATE_KEYS=(HOST AUTH PREFECT_PORT MLFLOW_PORT PG_PORT S3_PORT POOL BUCKET S3_EXTERNAL S3_MODE S3_ENDPOINT STORE_URL
            MLFLOW_ARTIFACTS MLFLOW_WORKERS MLFLOW_ALLOWED_HOSTS MLFLOW_ADMIN_USER SRC_PG SRC_PREFECT SRC_MLFLOW SRC_FLASK
            PG_SOCK WITH_WORKER PREFECT_UI_API)

save_state() {
  local tmp="$STATE.tmp" k
  {
    echo "# written by $PROG up; not secret"
    for k in "${STATE_KEYS[@]}"; do printf '%s=%q\n' "$k" "${!k-}"; done
  } >"$tmp"
  mv -f "$tmp" "$STATE"
}

load_state() {
  [ -f "$STATE" ] || return 1
  local line k v
  while IFS= read -r line; do
    [[ "$line" =~ ^([A-Z0-9_]+)=(.*)$ ]] || continue
    k="${BASH_REMATCH[1]}"; v="${BASH_REMATCH[2]}"
    case " ${STATE_KEYS[*]} " in *" $k "*) ;; *) continue ;; esac
    eval "v=$v"          # values were written with printf %q by save_state
    printf -v "$k" '%s' "$v"
  done <"$STATE"
  # a record written before S3 became optional: S3 was moto, or the endpoint given
  if [ -z "${S3_MODE:-}" ]; then if [ -n "${S3_EXTERNAL:-}" ]; then S3_MODE=external; else S3_MODE=moto; fi; fi
}

client_host() { case "$HOST" in 0.0.0.0|::|"") echo 127.0.0.1 ;; *) echo "$HOST" ;; esac; }
url_host() { case "$1" in *:*) echo "[$1]" ;; *) echo "$1" ;; esac; }
prefect_url() { echo "http://$(url_host "$(client_host)"):$PREFECT_PORT"; }
mlflow_url() { echo "http://$(url_host "$(client_host)"):$MLFLOW_PORT"; }

# ---------------------------------------------------------------- secrets
gen_secret() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }

# secret NAME SRC ENVVAR [PREFIX]: the value (env wins; else the file, generated once)
secret() {
  local name="$1" src="$2" var="$3" prefix="${4:-}" f="$SECRETS/$1"
  if [ "$src" = env ]; then
    [ -n "${!var:-}" ] || die "$var was set when the stack started; set it again in this shell"
    printf '%s' "${!var}"
    return
  fi
  if [ ! -s "$f" ]; then
    (umask 077; mkdir -p "$SECRETS"; printf '%s%s' "$prefix" "$(gen_secret)" >"$f.tmp"; mv -f "$f.tmp" "$f")
  fi
  cat "$f"
}

load_secrets() {
  mkdir -p "$SECRETS"; chmod 700 "$SECRETS"
  PG_PASSWORD="$(secret pg_password "$SRC_PG" AMED_PG_PASSWORD)"
  if [ "$AUTH" = 1 ]; then
    PREFECT_AUTH="$(secret prefect_auth_string "$SRC_PREFECT" AMED_PREFECT_AUTH_STRING admin:)"
    MLFLOW_ADMIN_PASSWORD="$(secret mlflow_admin_password "$SRC_MLFLOW" AMED_MLFLOW_ADMIN_PASSWORD)"
    MLFLOW_SECRET_KEY="$(secret mlflow_secret_key "$SRC_FLASK" AMED_MLFLOW_SECRET_KEY)"
  fi
}

# ---------------------------------------------------------------- processes
pidfile() { echo "$RUN/$1.pid"; }

recorded_pid() {  # the PID in NAME's pidfile, if the file holds one
  local f pid
  f="$(pidfile "$1")"
  [ -s "$f" ] || return 1
  pid="$(head -n 1 "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  echo "$pid"
}

# the PID recorded for a service, if that process is alive and is still the one started (its command
# line names this stack's folder or port)
svc_pid() {
  local pid cmd
  pid="$(recorded_pid "$1")" || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  case "$1" in
    postgres) [[ "$cmd" == *"$STACK/pg/data"* ]] || return 1 ;;
    s3) [[ "$cmd" == *moto_server* ]] || return 1 ;;
    prefect) [[ "$cmd" == *prefect* ]] || return 1 ;;
    mlflow) [[ "$cmd" == *mlflow* ]] || return 1 ;;
    worker) [[ "$cmd" == *prefect* ]] || return 1 ;;
  esac
  echo "$pid"
}

# the PID this run just spawned for NAME, while that process lives. Unlike svc_pid it does not check the command
# line: between fork and exec the child still shows the script's own command line, and a busy machine can take
# a while to get past that, so "not yet exec'd" must not read as "exited while starting"
spawned_pid() {
  local pid state
  pid="$(recorded_pid "$1")" || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)"
  [ "$state" != Z ] && [ "$state" != X ] || return 1
  echo "$pid"
}

descendants() {  # all descendants of PID (children first found by walking ppid links)
  local p kids
  for p in "$@"; do
    kids="$(ps -o pid= --ppid "$p" 2>/dev/null | tr -d ' ' || true)"
    for k in $kids; do echo "$k"; descendants "$k"; done
  done
}

alive_any() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

# stop_tree NAME FIRST_SIGNAL GRACE: signal the service's process group, wait, then SIGKILL what is left
stop_tree() {
  local name="$1" sig="$2" grace="$3" pid pids t t0=$SECONDS
  pid="$(svc_pid "$name")" || { rm -f "$(pidfile "$name")"; return 0; }
  pids="$pid $(descendants "$pid" | tr '\n' ' ')"
  kill -"$sig" -- "-$pid" 2>/dev/null || kill -"$sig" "$pid" 2>/dev/null || true
  t=0
  while alive_any $pids && [ "$t" -lt $((grace * 5)) ]; do sleep 0.2; t=$((t + 1)); done
  if alive_any $pids; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 2
    kill -KILL -- "-$pid" 2>/dev/null || true
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  fi
  rm -f "$(pidfile "$name")"
  echo "  $name stopped (pid $pid, $((SECONDS - t0)) s)"
}

# spawn NAME CMD...: start in its own session (process group = its PID), output to logs/NAME.log
spawn() {
  local name="$1"; shift
  echo "=== $(date -u +%FT%TZ) $PROG up: starting $name" >>"$LOGS/$name.log"
  # a background command of a script starts with SIGINT ignored, and Python then keeps it ignored: put the
  # default back before exec, so that the servers and the worker stop on SIGINT/SIGTERM as they should
  setsid "$PY" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL); signal.signal(signal.SIGQUIT, signal.SIG_DFL)
os.execv(sys.argv[1], sys.argv[1:])' "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$(pidfile "$name")"
  up_started "$name"
}

# ---------------------------------------------------------------- a failed `up` stops what it started
# The services this `up` started are listed in run/up.started (a file: spawn runs in subshells); the EXIT trap
# of cmd_up stops them when `up` fails, so a failed `up` leaves nothing running that it started.
up_started() { [ -n "${UP_STARTED_FILE:-}" ] && echo "$1" >>"$UP_STARTED_FILE"; return 0; }

up_cleanup_note() {  # what a failing `up` is about to stop (for its one error line)
  [ -n "${UP_STARTED_FILE:-}" ] && [ -s "$UP_STARTED_FILE" ] || return 0
  printf '; stopping what this up started (%s)' "$(tr '\n' ' ' <"$UP_STARTED_FILE" | sed 's/ $//')"
}

on_up_exit() {
  local rc=$? names
  trap - EXIT
  if [ "$rc" != 0 ] && [ -s "${UP_STARTED_FILE:-/nonexistent}" ]; then
    names="$(tac "$UP_STARTED_FILE" | tr '\n' ' ')"
    { echo "=== $(date -u +%FT%TZ) $PROG up failed (exit $rc): stopping $names"; stop_services $names; } \
      >>"$LOGS/up-failed.log" 2>&1 || true
  fi
  rm -f "${UP_STARTED_FILE:-}"
  exit "$rc"
}

fail_log() {  # fail_log NAME MESSAGE...: one line naming the log and its last line; then exit 1 (see die)
  local log="$LOGS/$1.log" last
  shift
  last="$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | tr -s '[:space:]' ' ' | cut -c1-200 || true)"
  echo "$PROG: error: $* (log: $log${last:+; its last line: $last})$(up_cleanup_note)" >&2
  exit 1
}

port_free() {  # port_free HOST PORT
  "$PY" - "$1" "$2" <<'EOF'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((host, port))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

need_port() {  # need_port SERVICE HOST PORT VAR
  port_free "$2" "$3" || die "$1: port $3 on $2 is taken by another process; choose another with $4=PORT"
}

# http_status URL [prefect|mlflow]: the HTTP status code (000 when nothing answers); credentials travel in the
# environment of the Python process, never on a command line
http_status() {
  local url="$1" mode="${2:-none}"
  _AMED_MODE="$mode" _AMED_PREFECT_AUTH="${PREFECT_AUTH:-}" _AMED_ML_USER="${MLFLOW_ADMIN_USER:-}" \
  _AMED_ML_PASS="${MLFLOW_ADMIN_PASSWORD:-}" "$PY" - "$url" <<'EOF'
import base64, os, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
mode = os.environ["_AMED_MODE"]
cred = {"prefect": os.environ["_AMED_PREFECT_AUTH"],
        "mlflow": os.environ["_AMED_ML_USER"] + ":" + os.environ["_AMED_ML_PASS"]}.get(mode)
if cred:
    req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

# wait_http NAME URL MODE TIMEOUT: until URL answers 200 (the process must stay alive)
wait_http() {
  local name="$1" url="$2" mode="$3" timeout="$4" start code pid
  start=$SECONDS
  while :; do
    pid="$(spawned_pid "$name")" || fail_log "$name" "$name exited while starting"
    code="$(http_status "$url" "$mode")"
    if [ "$code" = 200 ]; then
      [ -z "${5:-}" ] || echo "  $name answers ($((SECONDS - T0)) s)"
      return 0
    fi
    if [ "$code" = 401 ] || [ "$code" = 403 ]; then
      fail_log "$name" "$name refused the stack's own credentials ($code at $url); if its users were created" \
        "with other credentials earlier, set the same AMED_* secret again or rotate them through its API"
    fi
    [ $((SECONDS - start)) -lt "$timeout" ] || fail_log "$name" "$name did not answer at $url within ${timeout}s (pid $pid)"
    sleep 0.5
  done
}

# ---------------------------------------------------------------- services
PG_OSUSER=postgres
pg_super() { if [ "$(id -u)" = 0 ]; then echo "$PG_OSUSER"; else id -un; fi; }

start_postgres() {
  local data="$STACK/pg/data" pid
  if pid="$(svc_pid postgres)"; then echo "  postgres already running (pid $pid)"; return; fi
  if [ "$(id -u)" = 0 ]; then
    getent passwd "$PG_OSUSER" >/dev/null || die "user $PG_OSUSER missing (it comes with Debian's postgresql package)"
  fi
  mkdir -p "$STACK/pg"
  [ "$(id -u)" = 0 ] && chown "$PG_OSUSER": "$STACK/pg"
  chmod 700 "$STACK/pg"
  as_pg test -w "$STACK/pg" || die "PostgreSQL runs as '$PG_OSUSER', who cannot reach $STACK/pg; make the folders" \
    "above it traversable (chmod o+x) or choose another AMED_STACK_DIR"
  # the socket (superuser, peer auth: only this OS user) lives in a private folder; TCP is 127.0.0.1 only
  PG_SOCK="$STACK/pg/run"
  if [ "${#PG_SOCK}" -gt 90 ] || [[ "$PG_SOCK" == *" "* ]]; then PG_SOCK="$(mktemp -d /tmp/amed-pg.XXXXXX)"; fi
  mkdir -p "$PG_SOCK"
  [ "$(id -u)" = 0 ] && chown "$PG_OSUSER": "$PG_SOCK"
  chmod 700 "$PG_SOCK"
  touch "$LOGS/postgres.log"
  [ "$(id -u)" = 0 ] && chown "$PG_OSUSER": "$LOGS/postgres.log"
  if [ ! -s "$data/PG_VERSION" ]; then
    echo "  postgres: initdb $data"
    as_pg initdb -D "$data" -U "$(pg_super)" -E UTF8 --locale=C --auth-local=peer --auth-host=scram-sha-256 \
      >>"$LOGS/postgres.log" 2>&1 || fail_log postgres "initdb failed"
  fi
  need_port postgres 127.0.0.1 "$PG_PORT" AMED_PG_PORT
  # this script's settings, rewritten on every start (the port may change), included by postgresql.conf
  cat >"$data/amed-stack.conf" <<EOF
# written by $PROG up
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
EOF
  grep -q "^include_if_exists = 'amed-stack.conf'" "$data/postgresql.conf" \
    || echo "include_if_exists = 'amed-stack.conf'" >>"$data/postgresql.conf"
  [ "$(id -u)" = 0 ] && chown "$PG_OSUSER": "$data/amed-stack.conf"
  up_started postgres
  as_pg pg_ctl -D "$data" -l "$LOGS/postgres.log" -w -t "$TIMEOUT" start >/dev/null 2>>"$LOGS/postgres.log" \
    || fail_log postgres "PostgreSQL did not start"
  head -n 1 "$data/postmaster.pid" >"$(pidfile postgres)"
  echo "  postgres started (pid $(head -n 1 "$(pidfile postgres)"), 127.0.0.1:$PG_PORT)"
}

psql_super() {  # SQL on stdin, as the superuser over the private socket
  as_pg psql -X -q -At -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U "$(pg_super)" -d postgres
}

# role `amed` (not a superuser) owns the databases; its password is set from the secret on every `up`, as a
# SCRAM verifier computed here, so the clear password never reaches the server or its log
setup_databases() {
  local verifier db
  verifier="$(_AMED_PW="$PG_PASSWORD" "$PY" - <<'EOF'
import base64, hashlib, hmac, os
pw, salt, it = os.environ["_AMED_PW"].encode(), os.urandom(16), 4096
salted = hashlib.pbkdf2_hmac("sha256", pw, salt, it)
stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
server = hmac.new(salted, b"Server Key", "sha256").digest()
b = lambda x: base64.b64encode(x).decode()
print(f"SCRAM-SHA-256${it}:{b(salt)}${b(stored)}:{b(server)}")
EOF
)"
  {
    echo "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'amed') THEN CREATE ROLE amed LOGIN; END IF; END \$\$;"
    echo "ALTER ROLE amed LOGIN PASSWORD '$verifier';"
  } | psql_super >>"$LOGS/postgres.log" 2>&1 || fail_log postgres "could not create the role amed"
  for db in prefect mlflow mlflow_auth; do
    if [ -z "$(echo "SELECT 1 FROM pg_database WHERE datname = '$db';" | psql_super 2>>"$LOGS/postgres.log")" ]; then
      echo "CREATE DATABASE $db OWNER amed;" | psql_super >>"$LOGS/postgres.log" 2>&1 \
        || fail_log postgres "could not create database $db"
    fi
  done
}

start_s3() {
  local pid
  if [ "$S3_MODE" = external ]; then echo "  s3: using $S3_EXTERNAL (AMED_S3_ENDPOINT)"; return; fi
  if pid="$(svc_pid s3)"; then echo "  s3 (moto) already running (pid $pid)"; return; fi
  # as the extra local-s3 (pyproject.toml): resolved with s3fs's aiobotocore, botocore stays in its window
  [ -x "$BIN/moto_server" ] || die "AMED_STACK_S3=moto needs moto's server in $BIN: pip install -e '.[local-s3]'" \
    "(or leave AMED_STACK_S3 unset: the store on disk)"
  need_port s3 127.0.0.1 "$S3_PORT" AMED_S3_PORT
  spawn s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  echo "  s3 (moto) starting (pid $(cat "$(pidfile s3)")), $S3_ENDPOINT"
}

s3_env() {  # run "$@" with the S3 endpoint (and moto's dummy keys when it is moto); as is without S3
  if [ "$S3_MODE" = none ]; then
    "$@"
  elif [ "$S3_MODE" = external ]; then
    AWS_ENDPOINT_URL="$S3_ENDPOINT" MLFLOW_S3_ENDPOINT_URL="$S3_ENDPOINT" "$@"
  else
    AWS_ENDPOINT_URL="$S3_ENDPOINT" MLFLOW_S3_ENDPOINT_URL="$S3_ENDPOINT" AWS_ACCESS_KEY_ID=testing \
    AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN= AWS_REGION="${AWS_REGION:-us-east-1}" \
    AWS_DEFAULT_REGION="${AWS_REGION:-us-east-1}" AWS_EC2_METADATA_DISABLED=true \
    AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_CONFIG_FILE=/dev/null "$@"
  fi
}

ensure_bucket() {
  s3_env "$PY" - "$BUCKET" >>"$LOGS/s3.log" 2>&1 <<'EOF' || fail_log s3 "could not reach or create bucket $BUCKET at $S3_ENDPOINT"
import sys, boto3, botocore
s3 = boto3.client("s3")
try:
    s3.head_bucket(Bucket=sys.argv[1])
except botocore.exceptions.ClientError:
    s3.create_bucket(Bucket=sys.argv[1])
print("bucket", sys.argv[1], "ready")
EOF
}

start_prefect() {
  local pid
  if pid="$(svc_pid prefect)"; then echo "  prefect already running (pid $pid)"; return; fi
  need_port prefect "$HOST" "$PREFECT_PORT" AMED_PREFECT_PORT
  mkdir -p "$STACK/prefect-home"
  (
    unset PREFECT_API_URL PREFECT_API_KEY PREFECT_API_AUTH_STRING PREFECT_SERVER_API_AUTH_STRING
    unset PREFECT_API_DATABASE_PASSWORD PREFECT_SERVER_DATABASE_PASSWORD
    [ "$AUTH" = 1 ] && export PREFECT_SERVER_API_AUTH_STRING="$PREFECT_AUTH"
    # the database password reaches asyncpg through PGPASSWORD, never in the URL or on a command line
    PGPASSWORD="$PG_PASSWORD" PREFECT_HOME="$STACK/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://amed@127.0.0.1:$PG_PORT/prefect" \
    PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
    PREFECT_UI_API_URL="${PREFECT_UI_API:-$(prefect_url)/api}" \
      spawn prefect "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
  )
  echo "  prefect starting (pid $(cat "$(pidfile prefect)")), $(prefect_url)"
}

start_mlflow() {
  local pid args
  if pid="$(svc_pid mlflow)"; then echo "  mlflow already running (pid $pid)"; return; fi
  "$PY" -c 'import psycopg2' 2>/dev/null || die "psycopg2 missing in $BIN: pip install psycopg2-binary (MLflow's PostgreSQL driver)"
  need_port mlflow "$HOST" "$MLFLOW_PORT" AMED_MLFLOW_PORT
  mkdir -p "$STACK/mlflow"
  case "$MLFLOW_ARTIFACTS" in *://*) ;; *) mkdir -p "$MLFLOW_ARTIFACTS" ;; esac
  args=(server --backend-store-uri "postgresql+psycopg2://amed@127.0.0.1:$PG_PORT/mlflow"
        --artifacts-destination "$MLFLOW_ARTIFACTS" --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS")
  [ -n "$MLFLOW_ALLOWED_HOSTS" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
  if [ "$AUTH" = 1 ]; then
    "$PY" -c 'import flask_wtf' 2>/dev/null || die "Flask-WTF missing in $BIN: pip install 'mlflow[auth]' (MLflow's basic-auth app)"
    cat >"$STACK/mlflow/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://amed@127.0.0.1:$PG_PORT/mlflow_auth
admin_username = $MLFLOW_ADMIN_USER
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    args+=(--app-name basic-auth)
  fi
  # the admin password and the Flask key are in the environment only when auth is on; the password of the
  # database reaches psycopg2 through PGPASSWORD, never in a URI or on a command line
  (
    cd "$STACK/mlflow"
    if [ "$AUTH" = 1 ]; then
      export MLFLOW_AUTH_CONFIG_PATH="$STACK/mlflow/basic_auth.ini" MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_ADMIN_USER"
      export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD" MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_SECRET_KEY"
    else
      unset MLFLOW_AUTH_CONFIG_PATH MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
    PGPASSWORD="$PG_PASSWORD" MLFLOW_DISABLE_TELEMETRY=true s3_env spawn mlflow "$BIN/mlflow" "${args[@]}"
  )
  echo "  mlflow starting (pid $(cat "$(pidfile mlflow)")), $(mlflow_url)"
}

prefect_client() {  # run a prefect CLI command as a client of this stack
  PREFECT_API_URL="$(prefect_url)/api" PREFECT_API_AUTH_STRING="${PREFECT_AUTH:-}" \
  PREFECT_HOME="$STACK/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 "$@"
}

ensure_pool() {
  local out
  out="$(prefect_client "$BIN/prefect" --no-prompt work-pool create "$POOL" --type process 2>&1)" && {
    echo "  work pool $POOL created (process)"; return; }
  if [[ "$out" == *"already exists"* ]]; then echo "  work pool $POOL exists"; return; fi
  printf '%s\n' "$out" >>"$LOGS/prefect.log"
  fail_log prefect "could not create work pool $POOL"
}

start_worker() {
  local pid
  if pid="$(svc_pid worker)"; then echo "  worker already running (pid $pid)"; return; fi
  # flow runs are children of the worker and inherit its environment: the tracking server, the store and
  # (with auth) the clients' credentials
  (
    cd "$ROOT"
    if [ "$AUTH" = 1 ]; then
      export MLFLOW_TRACKING_USERNAME="$MLFLOW_ADMIN_USER" MLFLOW_TRACKING_PASSWORD="$MLFLOW_ADMIN_PASSWORD"
    fi
    MLFLOW_TRACKING_URI="$(mlflow_url)" AMED_STORE_URL="$STORE_URL" MLFLOW_DISABLE_TELEMETRY=true \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
      s3_env prefect_client spawn worker "$BIN/prefect" worker start --pool "$POOL" --name "amed-local-worker"
  )
  echo "  worker starting (pid $(cat "$(pidfile worker)")), pool $POOL"
}

wait_worker() {
  local start=$SECONDS pid
  while :; do
    pid="$(spawned_pid worker)" || fail_log worker "the worker exited while starting"
    if grep -q "started!" "$LOGS/worker.log" 2>/dev/null && worker_online; then return 0; fi
    [ $((SECONDS - start)) -lt "$TIMEOUT" ] || fail_log worker "the worker did not come online in pool $POOL within ${TIMEOUT}s"
    sleep 1
  done
}

worker_online() {  # the pool has a worker with a recent heartbeat
  _AMED_AUTH="${PREFECT_AUTH:-}" "$PY" - "$(prefect_url)/api/work_pools/$POOL/workers/filter" <<'EOF'
import base64, json, os, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=b"{}", method="POST", headers={"Content-Type": "application/json"})
if os.environ["_AMED_AUTH"]:
    req.add_header("Authorization", "Basic " + base64.b64encode(os.environ["_AMED_AUTH"].encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        workers = json.load(r)
except Exception:
    sys.exit(1)
sys.exit(0 if any(w.get("status") == "ONLINE" for w in workers) else 1)
EOF
}

# ---------------------------------------------------------------- commands
print_urls() {
  echo "Prefect UI + API  $(prefect_url)        (PREFECT_API_URL=$(prefect_url)/api; pool $POOL)"
  echo "MLflow            $(mlflow_url)         (artifacts $MLFLOW_ARTIFACTS)"
  echo "PostgreSQL        127.0.0.1:$PG_PORT    (role amed; databases prefect, mlflow, mlflow_auth)"
  case "$S3_MODE" in
    none) echo "Store             $STORE_URL  (on disk: kept by down and up)" ;;
    external) echo "S3                $S3_ENDPOINT     (yours; store $STORE_URL)" ;;
    moto) echo "S3 (moto)         $S3_ENDPOINT     (in memory: lost at down; store $STORE_URL)" ;;
  esac
  if [ "$AUTH" = 1 ]; then
    echo "Auth              on: Prefect API auth string, MLflow basic-auth (user $MLFLOW_ADMIN_USER); secrets in the" \
         "environment or under $SECRETS (0600)"
  fi
  echo "Logs and PIDs     $LOGS  $RUN"
  echo "In each client shell:  eval \"\$($ROOT/infra/local-stack.sh env)\""
}

cmd_up() {
  local with_worker=0 any=0 s
  T0=$SECONDS
  for a in "$@"; do
    case "$a" in --worker) with_worker=1 ;; *) die "up: unknown option '$a' (use --worker)" ;; esac
  done
  mkdir -p "$STACK" "$LOGS" "$RUN"
  UP_STARTED_FILE="$RUN/up.started"
  : >"$UP_STARTED_FILE"
  trap on_up_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  find_bin
  # a stack that still runs keeps the settings it was started with
  if load_state; then
    for s in "${SERVICES[@]}"; do svc_pid "$s" >/dev/null && any=1; done
  fi
  if [ "$any" = 1 ]; then
    note "some services run already: keeping the settings in $STATE"
    [ "${WITH_WORKER:-0}" = 1 ] && with_worker=1
  else
    fresh_settings
    PG_SOCK=""
  fi
  WITH_WORKER="$with_worker"
  TIMEOUT="${AMED_STACK_TIMEOUT:-180}"
  load_secrets
  echo "Starting the local stack in $STACK"
  install_pg
  start_postgres
  save_state
  setup_databases
  if [ "$S3_MODE" != none ]; then
    start_s3
    [ "$S3_MODE" != moto ] || wait_http s3 "$S3_ENDPOINT/" none 60 say
    ensure_bucket
  fi
  start_prefect
  start_mlflow
  local mode_p=none mode_m=none
  [ "$AUTH" = 1 ] && mode_p=prefect && mode_m=mlflow
  wait_http prefect "$(prefect_url)/api/health" none "$TIMEOUT"
  wait_http prefect "$(prefect_url)/api/admin/version" "$mode_p" "$TIMEOUT" say
  wait_http mlflow "$(mlflow_url)/health" none "$TIMEOUT"
  wait_http mlflow "$(mlflow_url)/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default" "$mode_m" "$TIMEOUT" say
  ensure_pool
  if [ "$with_worker" = 1 ]; then start_worker; wait_worker; fi
  save_state
  rm -f "$UP_STARTED_FILE"
  UP_STARTED_FILE=""
  echo "Stack up in $((SECONDS - T0)) s:"
  print_urls
}

stop_postgres() {
  if svc_pid postgres >/dev/null; then
    find_pg || true
    if [ -n "${PG_BIN:-}" ] && as_pg pg_ctl -D "$STACK/pg/data" -m fast -w -t 30 stop >/dev/null 2>>"$LOGS/postgres.log"; then
      echo "  postgres stopped"; rm -f "$(pidfile postgres)"
    else
      stop_tree postgres TERM 15
    fi
  else
    rm -f "$(pidfile postgres)"
  fi
}

stop_services() {  # stop_services NAME...: each one that runs, in the order given
  local s
  for s in "$@"; do
    case "$s" in
      worker) stop_tree worker INT 20 ;;       # a Prefect worker stops on SIGINT (it ignores SIGTERM for a while)
      mlflow) stop_tree mlflow TERM 15 ;;
      prefect) stop_tree prefect TERM 15 ;;
      s3) stop_tree s3 TERM 5 ;;
      postgres) stop_postgres ;;
    esac
  done
}

cmd_down() {
  if ! load_state; then
    # no record: stop whatever PID files say (nothing when there are none)
    PG_SOCK=""
  fi
  [ -d "$RUN" ] || { echo "nothing to stop in $STACK"; return 0; }
  echo "Stopping the local stack in $STACK"
  stop_services worker mlflow prefect s3 postgres
  case "${PG_SOCK:-}" in /tmp/amed-pg.*) rmdir "$PG_SOCK" 2>/dev/null || true ;; esac
  echo "Stack down (data kept in $STACK)"
}

cmd_status() {
  local s pid state rc=0 detail
  if ! load_state; then
    for s in "${SERVICES[@]}"; do printf '%-9s down\n' "$s"; done
    echo "(no stack recorded in $STACK)"
    return 1
  fi
  find_bin
  for s in "${SERVICES[@]}"; do
    detail=""
    case "$s" in
      postgres) detail="127.0.0.1:$PG_PORT" ;;
      s3) detail="$S3_ENDPOINT"
          if [ "$S3_MODE" = none ]; then printf '%-9s %-5s %s\n' s3 off "(none: the store is $STORE_URL)"; continue; fi
          if [ "$S3_MODE" = external ]; then
            printf '%-9s %-5s %s\n' s3 "$([ "$(http_status "$S3_ENDPOINT/")" != 000 ] && echo up || echo down)" "$detail (external)"
            continue; fi ;;
      prefect) detail="$(prefect_url)" ;;
      mlflow) detail="$(mlflow_url)" ;;
      worker) detail="pool $POOL" ;;
    esac
    if pid="$(svc_pid "$s")"; then
      state=up
      case "$s" in
        prefect) [ "$(http_status "$(prefect_url)/api/health")" = 200 ] || state="up (not answering)" ;;
        mlflow) [ "$(http_status "$(mlflow_url)/health")" = 200 ] || state="up (not answering)" ;;
        s3) [ "$(http_status "$S3_ENDPOINT/")" = 200 ] || state="up (not answering)" ;;
      esac
      [ "$state" = up ] || rc=1
      printf '%-9s %-5s %s (pid %s)\n' "$s" "$state" "$detail" "$pid"
    else
      printf '%-9s %-5s %s\n' "$s" down "$detail"
      if [ "$s" != worker ] || [ "${WITH_WORKER:-0}" = 1 ]; then rc=1; fi
    fi
  done
  [ "$AUTH" = 1 ] && echo "auth: on"
  return "$rc"
}

# export lines for clients; a secret is never printed: the line reads it from its 0600 file, or from the
# AMED_* variable it was given in
secret_ref() {  # secret_ref NAME SRC ENVVAR
  if [ "$2" = env ]; then printf '"${%s:?set %s (the stack was started with it)}"' "$3" "$3"
  else local f="$SECRETS/$1"; printf '"$(cat '"'"'%s'"'"')"' "${f//\'/\'\\\'\'}"; fi
}

cmd_env() {
  local s
  load_state || die "no stack recorded in $STACK: run '$PROG up' first (or set AMED_STACK_DIR)"
  # exports of services that do not run would send the next commands to nothing (or to another server)
  for s in prefect mlflow; do
    svc_pid "$s" >/dev/null || die "the stack in $STACK is not up ($s is not running): run '$PROG up' first"
  done
  echo "export PREFECT_API_URL=$(prefect_url)/api"
  echo "export MLFLOW_TRACKING_URI=$(mlflow_url)"
  if [ "$S3_MODE" != none ]; then
    echo "export AWS_ENDPOINT_URL=$S3_ENDPOINT"
    echo "export MLFLOW_S3_ENDPOINT_URL=$S3_ENDPOINT"
  fi
  if [ "$S3_MODE" = moto ]; then
    echo "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=\${AWS_REGION:-us-east-1}  # moto's dummy keys"
  fi
  printf 'export AMED_STORE_URL=%q\n' "$STORE_URL"
  if [ "$AUTH" = 1 ]; then
    echo "export PREFECT_API_AUTH_STRING=$(secret_ref prefect_auth_string "$SRC_PREFECT" AMED_PREFECT_AUTH_STRING)"
    echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_ADMIN_USER"
    echo "export MLFLOW_TRACKING_PASSWORD=$(secret_ref mlflow_admin_password "$SRC_MLFLOW" AMED_MLFLOW_ADMIN_PASSWORD)"
  fi
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down ;;
  status) shift; cmd_status ;;
  env) shift; cmd_env ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; [ -n "${1:-}" ] && exit 2; exit 0 ;;
esac
