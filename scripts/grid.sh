#!/usr/bin/env bash
# Run reproduce.py tables from a frozen clone of this checkout's HEAD, so commits made while a
# grid runs do not move it, with every finished cell archived into this checkout's
# reports/cells (commit it as cells finish: a new machine starts without runs_dir).
#   scripts/grid.sh radius frontier length -- jobs=2 threads=1
# Tables run in order; what follows -- goes to every reproduce.py call. The clone, its runs_dir
# and its reports live under ORTHODIFF_CACHE (default ~/.cache/orthodiff); write the committed
# reports afterwards from this checkout (python reproduce.py table=<t>: the archive's cells).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ORTHODIFF_CACHE:-$HOME/.cache/orthodiff}
rev=$(git -C "$here" rev-parse --short HEAD)
clone=$cache/worktrees/grid-$rev
tables=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do tables+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#tables[@]} -gt 0 ] || { echo "usage: scripts/grid.sh <table> [<table> ...] [-- <reproduce.py overrides>]" >&2; exit 2; }
[ -d "$here/data/shapes" ] || make -C "$here" shapes
[ -d "$clone" ] || git clone --quiet "$here" "$clone"
ln -sfn "$here/data/shapes" "$clone/data/shapes"
cd "$clone"
for table in "${tables[@]}"; do
  echo "$(date -u '+%F %T') grid-$rev: table=$table"
  # PYTHONPATH: the clone's own code, not an editable install of $here (reproduce.py checks).
  PYTHONPATH="$clone/src" python reproduce.py "table=$table" "runs_dir=$cache/runs" "out_dir=$cache/reports-$rev" \
    "cells_archive=$here/reports/cells" "hydra.run.dir=$cache/hydra/$rev-$table" "$@"
done
