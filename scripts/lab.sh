#!/usr/bin/env bash
# The project's two commands (see README):
#   bash scripts/lab.sh run    set up .venv if needed, then execute every notebook headless (papermill) on the
#                              embedded model: executed copies -> build/notebooks/, figures -> figures/, numbers -> results/
#   bash scripts/lab.sh test   same set-up (plus Chromium/Playwright), then the whole test suite: pytest (tests/,
#                              the browser test included) + nbval (notebooks/)
# Extra: bash scripts/lab.sh setup | browser (JupyterLab in headless Chromium only) | notebook NAME [parameter args:
#        -f FILE.yaml, -p NAME VALUE, -y YAML, -r NAME VALUE, as papermill's]
#        | sync-notebooks: after editing notebooks/NN_name.py or .ipynb, bring each pair in line (the newer file
#        wins: jupytext --sync), then strip the .ipynb (nbstripout); tests/test_notebook_pairs.py checks the pairs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"

usable_location() {  # a pip index / find-links entry that exists (pip skips missing local ones with a warning)
  case "$1" in
    file://*) [ -e "${1#file://}" ] ;;
    http://*|https://*) true ;;
    *) [ -e "$1" ] ;;
  esac
}

install_with_uv() {
  # uv (an ordinary PyPI package, installed into .venv with pip) installs the pinned set in ~20 s where pip takes
  # ~2.5 min (resolving, unpacking torch, byte-compiling). uv does not read pip's configuration, so pip's index,
  # extra indexes, find-links (e.g. a local CPU torch wheel) and constraint files are passed on explicitly.
  [ "${DIFFTRACK_NO_UV:-0}" != 1 ] || return 1
  [ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1 \
    || return 1
  local args=(--index-strategy unsafe-best-match) line key val v have_index=""
  while IFS= read -r line; do
    key="${line%%=*}"; val="${line#*=}"; val="${val#\'}"; val="${val%\'}"
    case "$key" in
      *.index-url) if [ -z "$have_index" ] && usable_location "$val"; then args+=(--index-url "$val"); have_index=1; fi ;;
      *.extra-index-url) for v in $val; do usable_location "$v" && args+=(--extra-index-url "$v"); done ;;
      *.find-links) for v in $val; do usable_location "$v" && args+=(--find-links "$v"); done ;;
      *.constraint) for v in $val; do [ -f "$v" ] && args+=(-c "$v"); done ;;
    esac
  done < <("$VENV/bin/python" -m pip config list 2>/dev/null)
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${args[@]}" -c constraints.txt -e ".[notebooks,test]"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[lab] creating virtual environment in .venv"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.difftrack-installed"
  local want
  want="$(cat constraints.txt pyproject.toml | sha1sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[lab] installing pinned dependencies (constraints.txt)"
    if ! install_with_uv; then
      echo "[lab] uv not available (or DIFFTRACK_NO_UV=1): installing with pip" >&2
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt \
        -e ".[notebooks,test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    fi
    echo "$want" > "$stamp"
  fi
  export MPLBACKEND=Agg PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # Each notebook runs in a new kernel that imports torch, diffusers and the library again: with bytecode caching
  # (.pyc written into .venv by the first kernel) an import takes ~5 s instead of ~16 s on the 2-core CPU, which
  # PYTHONDONTWRITEBYTECODE (set in some CI images) would throw away.
  unset PYTHONDONTWRITEBYTECODE
}

run_notebooks() {
  mkdir -p build/notebooks figures results
  # papermill per notebook (scripts/run_notebooks.py); a cell that reaches --execution-timeout fails the run with
  # "notebook X cell N (...) reached the execution timeout of T s" -- including the nbclient stall, in which
  # papermill itself would record the cell as completed and go on. No retry: the slider cells cannot stall
  # (difftrack.sliders.slider_panel draws in the kernel), so a timeout is a bug to look at.
  "$VENV/bin/python" scripts/run_notebooks.py --out-dir build/notebooks --cwd notebooks --log-output \
    --execution-timeout "${DIFFTRACK_CELL_TIMEOUT:-600}" "$@"
  echo "[lab] done: executed notebooks in build/notebooks/, figures in figures/, numbers in results/"
}

sync_notebooks() {
  # notebooks/jupytext.toml pairs each NN_name.ipynb with NN_name.py (percent format, cell metadata: tags only)
  local nb
  for nb in notebooks/[0-9]*.py notebooks/[0-9]*.ipynb; do
    [ -e "$nb" ] || continue
    case "$nb" in *.ipynb) [ -e "${nb%.ipynb}.py" ] && continue ;; esac  # a pair: synced once, through its .py
    "$VENV/bin/jupytext" --sync "$nb"
  done
  # committed stripped (ids 0..n); the filter settings jupytext records in the .ipynb stay in notebooks/jupytext.toml
  "$VENV/bin/python" -m nbstripout --extra-keys "metadata.jupytext" notebooks/[0-9]*.ipynb
}

cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup ;;
  sync-notebooks) setup; sync_notebooks ;;
  run) setup; start=$(date +%s); run_notebooks "$@"; echo "[lab] main job took $(( $(date +%s) - start )) s" ;;
  notebook) setup; nb="$1"; shift; mkdir -p build/notebooks  # no per-cell timeout unless DIFFTRACK_CELL_TIMEOUT
    "$VENV/bin/python" scripts/run_notebooks.py "notebooks/$nb" --out-dir build/notebooks --cwd notebooks \
      --log-output --execution-timeout "${DIFFTRACK_CELL_TIMEOUT:-0}" "$@" ;;
  test)
    setup
    bash scripts/install_browser.sh  # Debian chromium + pinned Playwright for tests/test_browser.py (no downloads)
    "$VENV/bin/python" -m nbstripout --verify notebooks/*.ipynb
    start=$(date +%s)
    # pytest: tests/ (unit, backbone, notebook-on-tiny-pipeline and JupyterLab-in-Chromium tests) + nbval of notebooks/
    "$VENV/bin/python" -m pytest -p no:cacheprovider -q tests notebooks --nbval-lax \
      --nbval-current-env --nbval-cell-timeout=1200 "$@"
    echo "[lab] test suite took $(( $(date +%s) - start )) s" ;;
  browser) setup; bash scripts/install_browser.sh; "$VENV/bin/python" -m pytest -p no:cacheprovider -q -m browser tests "$@" ;;
  *) echo "usage: bash scripts/lab.sh run|test|setup|browser|notebook NAME|sync-notebooks" >&2; exit 2 ;;
esac
