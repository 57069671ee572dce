#!/usr/bin/env bash
# The default `python -m sim.attack` (collab preset) from an empty cell store, at an older commit and at this
# checkout, one after the other on the same machine (run it idle: nothing else on the cores).
#
#     bash benchmarks/attack_vs_commit.sh [COMMIT (default bdf8fb6, before the suite's cells were tasks)] [WORK]
#
# Both runs find Step 1, the DPMs and the MDP sets stored (made once, by this checkout, with `--attacks prior`,
# and copied: the artefact keys are the same at both commits) and train every attacker model anew. Then
# a third run of this checkout with another attacker seed (`--set attack.seed=2`, untimed) measures the noise the
# differences must stay within, and benchmarks/attack_vs_commit.py writes results/benchmark/attack-vs-<commit>.md|csv:
# both wall times, the ratio, each victim's worst case per mode at both commits and the two seeds' difference.
set -uo pipefail
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
COMMIT=${1:-bdf8fb6} WORK=${2:-/tmp/attack-vs-commit}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# the older checkout looks for ../shared/data beside itself, which a worktree under WORK lacks
export POISONPOOL_DATA=${POISONPOOL_DATA:-$(cd "$HERE/.." && pwd)/shared/data}
SRC=$WORK/src-$COMMIT NEW=$WORK/new OLD=$WORK/old NOISE=$WORK/noise
mkdir -p "$WORK"
[ -d "$SRC" ] || git -C "$HERE" worktree add --detach "$SRC" "$COMMIT"
stamp() { echo "== $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $*"; }
stamp prepare
(cd "$HERE" && python -m sim.attack --results-root "$NEW" --attacks prior --sequential) > "$WORK/prepare.log" 2>&1 || exit 1
for root in "$OLD" "$NOISE"; do rm -rf "$root" && mkdir -p "$root" && cp -r "$NEW/artefacts" "$root/artefacts"; done
(cd "$SRC" && python -m sim.attack --results-root "$OLD" --attacks prior) > "$WORK/prepare-old.log" 2>&1 || exit 1
for root in "$OLD" "$NEW" "$NOISE"; do  # an empty cell store, and no attacker model stored
  rm -rf "$root/attack"; find "$root/artefacts" -path '*/private/*/attack' -prune -exec rm -rf {} +
done
stamp "$COMMIT"
s=$(date +%s); (cd "$SRC" && python -m sim.attack --results-root "$OLD") > "$WORK/old.log" 2>&1 || exit 1
old_s=$(( $(date +%s) - s ))
stamp this checkout
s=$(date +%s); (cd "$HERE" && python -m sim.attack --results-root "$NEW") > "$WORK/new.log" 2>&1 || exit 1
new_s=$(( $(date +%s) - s ))
stamp "noise: this checkout, attacker seed 2"
(cd "$HERE" && python -m sim.attack --results-root "$NOISE" --set attack.seed=2) > "$WORK/noise.log" 2>&1 || exit 1
stamp done
cd "$HERE" && python benchmarks/attack_vs_commit.py --before "$COMMIT" --old "$OLD" --new "$NEW" --seconds "$old_s" "$new_s" \
  --noise "$NOISE"
