#!/usr/bin/env bash
# Would a compiled build reach issue 5's 20k layer-steps/s? Compiles the hot modules of a scratch
# worktree of HEAD with mypyc (installed into the current environment if missing; not a project
# dependency), then times the finemoe, lru and mixtral-offloading replays of the compiled and the
# plain tree alternately on one pinned core (sim_speed.py, best of 3 each), writing one record per
# tree and round under OUTDIR. The default modules type-check clean (mypyc refuses modules with
# type errors; `cache`, `predictor`, `fine_predictor`, `expert_map` and `simulator` do not yet, and
# marking them `# mypy: ignore-errors` made the compiled replay crash).
#   bash benchmarks/compiled_probe.sh TRACE HISTORY OUTDIR [MODULES]
# e.g. bash benchmarks/compiled_probe.sh ref40_test.fmt ref_hist.fmt docs/results/compiled_probe
set -euo pipefail
trace=$(realpath "$1") hist=$(realpath "$2") out=$(realpath -m "$3")
mods=${4:-policy prefetcher stepper simlink baselines}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}  # the project's environment (`make setup`), or $PYTHON
"$py" -c "import torch" 2>/dev/null || { echo "no torch in $py: run make setup, or set PYTHON" >&2; exit 2; }
"$py" -c "import mypyc" 2>/dev/null || { echo "installing mypy into $py's environment"; "$py" -m pip install -q mypy; }
scratch=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$scratch/tree" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
git -C "$root" worktree add -q --detach "$scratch/tree" HEAD
files=()
for m in $mods; do
  files+=("finemoe/$m.py")
done
echo "compiling ${files[*]} (a few minutes)"
(cd "$scratch/tree/src" && "$py" -m mypyc "${files[@]}" >"$scratch/mypyc.log" 2>&1) || { tail -20 "$scratch/mypyc.log"; exit 1; }
mkdir -p "$out"
sha=$(git -C "$root" rev-parse HEAD)
for round in 1 2; do
  for tree in plain compiled; do
    dir=$root
    [ "$tree" = compiled ] && dir=$scratch/tree
    echo -n "round $round, $tree: "
    log=$scratch/${tree}_$round.log
    (cd "$dir" && FINEMOE_GIT_SHA=$sha taskset -c 1 "$py" benchmarks/sim_speed.py --traces "$trace" \
      --history "$hist" --limit 40 --policies finemoe,lru,mixtral-offloading --repeat 3 \
      --out "$out/${tree}_$round.json" >"$log" 2>&1) || { tail -20 "$log"; exit 1; }
    grep layer-steps "$log" | awk '{printf "%s %s  ", $1, $2}'
    echo
  done
done
