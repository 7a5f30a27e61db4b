#!/usr/bin/env bash
# Runs the quality study in the background for one working session on this 2-core machine, and
# brings its results into the repository. The training processes work in a git worktree (so that
# commits here never touch their files); everything they finish is copied back and committed here.
#
#   scripts/study_session.sh start     worktree at this repository's HEAD, two 1-thread processes sharing the plan
#                                      (STUDY_WORKERS=1 STUDY_THREADS=2: one 2-thread process, which takes the
#                                      plan's first unfinished run: the way to hurry one run that an issue waits on)
#   scripts/study_session.sh status    the processes, the run each one trains, its last epoch line
#   scripts/study_session.sh stop      end the processes (paused ones too); their runs keep their saved epochs
#   scripts/study_session.sh pause     SIGSTOP them (before any timing measurement) ...
#   scripts/study_session.sh resume    ... and SIGCONT
#   scripts/study_session.sh collect   copy finished result files here, rewrite the report, commit
#   scripts/study_session.sh park      pause, collect, copy unfinished runs to docs/study/parked, commit
#                                      (do this before the session ends: the machine does not keep them)
#
# Environment: STUDY_WORKTREE (default: ../study-worktree beside this repository), STUDY_LOGS
# (default: $STUDY_WORKTREE.logs). Needs ./.venv (scripts/setup.sh).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WT="${STUDY_WORKTREE:-$(dirname "$REPO")/study-worktree}"
LOGS="${STUDY_LOGS:-$WT.logs}"
PY="$REPO/.venv/bin/python"
# One process per core by default, each with one thread; each claims the next run no other trains.
for v in STUDY_WORKERS STUDY_THREADS; do
  [[ ${!v:-1} =~ ^[1-9][0-9]*$ ]] || { echo "$v=${!v} is not a whole number >= 1" >&2; exit 2; }
done
WORKERS=(); for ((i = 1; i <= ${STUDY_WORKERS:-2}; i++)); do WORKERS+=("worker$i"); done
THREADS="${STUDY_THREADS:-1}"

# Every worker's pid file, those of an earlier start with more workers too (pause must reach them all).
pids() { for f in "$LOGS"/worker*.pid; do [ -f "$f" ] && cat "$f"; done; true; }
# A pid file's process, if it is still a study worker (a dead worker's pid may name another process now).
alive() { kill -0 "$1" 2>/dev/null && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q "rearec study"; }
signal() { for p in $(pids); do alive "$p" && kill "-$1" "$p"; done; true; }

rearec_study() { (cd "$REPO" && PYTHONPATH="$REPO" OMP_NUM_THREADS=1 "$PY" -m rearec study "$@"); }

start() {
  [ -x "$PY" ] || { echo "no $PY: run scripts/setup.sh first" >&2; exit 1; }
  for p in $(pids); do alive "$p" && { echo "already running (pid $p): scripts/study_session.sh status" >&2; exit 1; }; done
  git -C "$REPO" worktree prune  # a worktree registered here whose folder went with the last machine
  if [ -d "$WT" ]; then  # drop the worktree's copies of files this repository has since committed
    (cd "$WT" && git status --short --untracked-files=all docs/study | awk '{print $2}' | while read -r f; do
       if cmp -s "$f" "$REPO/$f"; then rm -f "$f"; fi; done
     git checkout -q --detach "$(git -C "$REPO" rev-parse HEAD)") \
      || { echo "start: the worktree $WT could not move to this commit (see above)" >&2; exit 1; }
  else
    git -C "$REPO" worktree add -q --detach "$WT" HEAD
  fi
  mkdir -p "$LOGS"
  rm -f "$LOGS"/worker*.pid  # none is alive (checked above): an earlier start's, with more workers perhaps
  for b in "${WORKERS[@]}"; do
    # The pid file names the Python process itself (exec), so that pause/resume reach the trainer.
    # Each worker writes its own report out of the worktree's tracked files (collect writes the real one).
    (cd "$WT" && PYTHONPATH="$WT" exec nohup nice -n 5 "$PY" -m rearec study --run --threads "$THREADS" \
       --out "$LOGS/$b-report" --report "$LOGS/$b-report/results.md" >> "$LOGS/$b.log" 2>&1) &
    echo $! > "$LOGS/$b.pid"
  done
  sleep 2
  status
}

status() {
  # Every worker the last start made (its pid files), whatever STUDY_WORKERS says now.
  for f in "$LOGS"/worker*.pid; do
    [ -f "$f" ] || { echo "no worker started: scripts/study_session.sh start"; break; }
    b=$(basename "$f" .pid)
    p=$(cat "$f" 2>/dev/null || echo none)
    state=$( [ "$p" != none ] && alive "$p" && ps -o stat= -p "$p" | tr -d ' ' || echo gone)
    echo "$b: pid $p ($state) $(grep -E '^start ' "$LOGS/$b.log" 2>/dev/null | tail -1)"
    tail -1 "$LOGS/$b.log" 2>/dev/null | cut -c1-160
  done
}

collect() {
  local new=() f
  while read -r f; do
    [[ $f == *.json ]] || continue
    [[ $(basename "$f") == tmp-* ]] && continue  # a result being written (atomic_write's temporary file)
    cmp -s "$WT/$f" "$REPO/$f" && continue
    mkdir -p "$REPO/$(dirname "$f")" || return 1
    # Copied under a temporary name, checked to be whole JSON, then renamed: a full disk must not leave
    # a truncated result here for the commits below. (Under park's ||, set -e is off: hence the returns.)
    cp "$WT/$f" "$REPO/$f.tmp-collect" && "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$REPO/$f.tmp-collect" \
      && mv "$REPO/$f.tmp-collect" "$REPO/$f" \
      || { rm -f "$REPO/$f.tmp-collect"; echo "collect: could not copy $f whole" >&2; return 1; }
    [[ $f == */samples.json ]] || new+=("$(basename "$f" .json)")
  done < <(cd "$WT" && git status --short --untracked-files=all docs/study/runs | awk '{print $2}')
  [ ${#new[@]} -gt 0 ] || { echo "collect: no new result files"; return 0; }
  local n; n=$(ls "$REPO"/docs/study/runs/*/*.json | grep -vc samples.json)
  if ! rearec_study --threads 1 > "$LOGS/report.log" 2>&1; then
    # The results are committed all the same (a later collect rewrites the report): park must not drop
    # the parked copies of runs whose results would then be lost with the machine.
    echo "collect: the report failed; committing the result files alone:" >&2; tail -5 "$LOGS/report.log" >&2
    git -C "$REPO" add docs/study/runs || return 1
    git -C "$REPO" commit -q -m "Study results: ${new[*]} (report not regenerated: it failed)" -- docs/study/runs || return 1
    return 1
  fi
  git -C "$REPO" add docs/study docs/results.md || return 1
  git -C "$REPO" commit -q -m "Study results: ${new[*]}; report regenerated ($n runs finished)" -- docs/study docs/results.md \
    || return 1
  git -C "$REPO" log --oneline -1
}

park() {
  signal STOP
  collect || echo "park: parking all the same (the results are committed)" >&2
  # --park drops the parked copy of every run with a result file: each must be committed first, or a
  # run would leave the repository both ways.
  if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=all -- docs/study/runs)" ]; then
    { git -C "$REPO" add docs/study/runs && git -C "$REPO" commit -q -m "Study results (committed by park)" -- docs/study/runs; } \
      || { echo "park: the result files in docs/study/runs could not be committed; nothing was parked (commit them, then park again)" >&2; return 1; }
  fi
  rearec_study --park --work "$WT/runs/study"
  git -C "$REPO" add -A docs/study/parked
  if git -C "$REPO" diff --cached --quiet -- docs/study/parked; then echo "park: nothing changed"; else
    git -C "$REPO" commit -q -m "Study: park unfinished runs ($(ls -d "$REPO"/docs/study/parked/*/* 2>/dev/null | xargs -rn1 basename | paste -sd' '))" -- docs/study/parked
    git -C "$REPO" log --oneline -1
  fi
  echo "the processes stay paused: scripts/study_session.sh resume to go on"
}

case "${1:-}" in
  start) start ;; status) status ;; pause) signal STOP ;; resume) signal CONT ;;
  stop) signal TERM; signal CONT ;;  # a stopped process holds a TERM until it runs again
  collect) collect ;; park) park ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
