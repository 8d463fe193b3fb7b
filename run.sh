#!/usr/bin/env bash
# One entry point for a fresh machine: each command first creates or reuses .venv (scripts/setup.sh).
#
#   bash run.sh reproduce [--profile default|smoke|paper] [--force] [--stages a,b]   the pipeline
#   bash run.sh test [pytest args]                                               unit tests + smoke pipeline
#   bash run.sh lab [jupyterlab args]                                            JupyterLab on notebooks/
#   bash run.sh setup                                                            only install
#   bash run.sh moe2 ARGS...                                                     python -m moe2lib ARGS
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="${MOE2_VENV:-$ROOT/.venv}/bin/python"
cmd="${1:-help}"; [ $# -gt 0 ] && shift
case "$cmd" in
  setup) ;;
  reproduce) exec "$PY" -m moe2lib reproduce "$@" ;;
  test) exec "$PY" -m pytest "$@" ;;
  lab) dir=(--notebook-dir="$ROOT/notebooks")   # a folder given on the command line wins
       for a in "$@"; do case "$a" in --notebook-dir*|--ServerApp.root_dir*) dir=() ;; esac; done
       exec "$PY" -m jupyterlab ${dir[@]+"${dir[@]}"} "$@" ;;
  moe2) exec "$PY" -m moe2lib "$@" ;;
  *) sed -n '2,9p' "$0"; [ "$cmd" = help ] || exit 2 ;;
esac
