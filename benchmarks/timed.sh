# Sourced by the benchmark scripts: `timed NAME LIMIT_S CMD...` runs CMD with a time limit, its
# output to $out/NAME.txt and its exit code and wall time appended to $out/walls.txt; a run that
# failed or timed out leaves no worker holding a GPU for the next one.
timed() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=20 "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc, wall $((SECONDS - t0)) s" | tee -a "$out/walls.txt"
  if [ "$rc" -ne 0 ]; then
    pkill -9 -f dschat_cli.worker; pkill -9 -f deepspeed.launcher; sleep 2
  fi
}
