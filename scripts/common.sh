# Shared by the launch scripts (sourced): printing, running and counting their commands.
#   DRY_RUN=1     print each command (one shell-quoted line) instead of running it
#   KEEP_GOING=1  run the remaining commands after one fails (default: stop at the first failure)
[ "${DRY_RUN:-0}" != 0 ] || DRY_RUN=""; [ "${KEEP_GOING:-0}" != 0 ] || KEEP_GOING=""  # 0 or unset: off
failed=0

quote() {  # the arguments as one shell-quoted line: plain words as they are, others in single quotes
  quote_into "$@"
  echo "$QUOTED"
}

quote_into() {  # quote's line, into QUOTED (no subshell: a sweep prints hundreds of lines)
  local arg sq="'" esc="'\\''"
  QUOTED=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then QUOTED+=" $arg"; else QUOTED+=" '${arg//$sq/$esc}'"; fi
  done
  QUOTED=${QUOTED# }
}

flags_for() {  # method -> its flags from METHOD_TABLE ("name flags..." lines); status 1 if unknown
  local line
  for line in "${METHOD_TABLE[@]}"; do
    if [ "${line%% *}" = "$1" ]; then echo "${line#* }"; return 0; fi
  done
  return 1
}

method_flags() {  # method -> its flags, into the array FLAGS (no subshell); status 1 if unknown
  local line
  for line in "${METHOD_TABLE[@]}"; do
    if [ "${line%% *}" = "$1" ]; then read -r -a FLAGS <<< "${line#* }"; return 0; fi
  done
  return 1
}

run() {  # one command: print it (DRY_RUN) or run it; a failure stops the script unless KEEP_GOING
  local line status=0
  quote_into "$@"; line=$QUOTED
  if [ -n "$DRY_RUN" ]; then echo "$line"; return 0; fi
  echo "+ $line"
  "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    failed=$((failed + 1))
    echo "failed (exit $status): $line" >&2
    if [ -z "$KEEP_GOING" ]; then
      echo "stopped; rerun with --resume auto to continue stopped runs, KEEP_GOING=1 to go past failures" >&2
      exit "$status"
    fi
  fi
  return "$status"
}

finish() {  # the exit status of a whole sweep
  if [ "$failed" -gt 0 ]; then echo "$failed command(s) failed (see 'failed' lines above)" >&2; exit 1; fi
}
