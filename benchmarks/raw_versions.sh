#!/usr/bin/env bash
# Raw text forward rate of an older commit against this checkout, alternately, in one run.
#
#   benchmarks/raw_versions.sh <commit> [rounds=5] [seconds=8] [batches=32]
#
# The older commit is checked out as a git worktree and laid out as installed (zembed/ with its
# broker, cache, client, engines and tools folders linked in), then benchmarks/raw_text.py runs
# on each version in turn with the same venv, so only the model code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:?usage: raw_versions.sh <commit> [rounds] [seconds] [batches]}
rounds=${2:-5}; seconds=${3:-8}; batches=${4:-32}
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/old" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add -q "$tmp/old" "$commit"
mkdir -p "$tmp/pkg"
cp -r "$tmp/old/zembed" "$tmp/pkg/zembed"
for d in broker cache client engines tools; do
  rm -rf "$tmp/pkg/zembed/$d"
  ln -s "$tmp/old/$d" "$tmp/pkg/zembed/$d"
done
for _ in $(seq "$rounds"); do
  printf 'old %s ' "$commit"
  PYTHONPATH="$tmp/pkg" .venv/bin/python benchmarks/raw_text.py "$seconds" "$batches" 2>/dev/null
  printf 'new %s ' "$(git rev-parse --short HEAD)"
  .venv/bin/python benchmarks/raw_text.py "$seconds" "$batches" 2>/dev/null
done
