# Sourced by the bench scripts that run Herald nodes on a redis-server of their own.

# listening PORT: whether something accepts connections on 127.0.0.1:PORT.
listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_redis CPUS DIR LOG [ARG...]: starts REDIS_SERVER (default redis-server) on the first
# free port in 26379-26479, pinned to CPUS, its files in DIR, extra arguments after; sets
# REDIS_PORT and REDIS_PID, and returns once it listens (exits naming LOG if it never does).
start_redis() {
  local cpus=$1 dir=$2 log=$3 port
  shift 3
  REDIS_PORT=
  for port in $(seq 26379 26479); do
    if ! listening "$port"; then REDIS_PORT=$port; break; fi
  done
  if [[ -z $REDIS_PORT ]]; then
    echo "no free port for redis-server in 26379-26479" >&2
    exit 1
  fi
  mkdir -p "$dir"
  setsid taskset -c "$cpus" "${REDIS_SERVER:-redis-server}" --port "$REDIS_PORT" --bind 127.0.0.1 \
    --save "" --dir "$dir" "$@" >"$log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do listening "$REDIS_PORT" && return 0; sleep 0.1; done
  echo "redis-server did not start; see $log" >&2
  exit 1
}
