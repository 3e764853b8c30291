#!/usr/bin/env bash
# Installs what the browser test (tests/test_browser.py, `bash scripts/lab.sh browser`) needs:
#   - Debian's Chromium (/usr/bin/chromium) with apt-get, if it is missing and we are root;
#   - Playwright for Python (pinned) into .venv, if missing. Playwright only drives the system Chromium:
#     `playwright install` is never run (no browser download).
# Idempotent and quiet when everything is already there. Never fails the caller: without Chromium the browser test
# skips locally and fails under CI=true, with a message that names this script.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV_PY="${VENV_PY:-.venv/bin/python}"
PLAYWRIGHT_VERSION="${PLAYWRIGHT_VERSION:-1.65.2}"

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[browser] installing Debian chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
      || echo "[browser] WARNING: apt-get install chromium failed" >&2
  else
    echo "[browser] WARNING: /usr/bin/chromium missing and not root: install Debian's 'chromium' package" >&2
  fi
fi

if [ -x "$VENV_PY" ]; then
  have="$("$VENV_PY" -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null || true)"
  if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
    echo "[browser] pip install playwright==$PLAYWRIGHT_VERSION"
    "$VENV_PY" -m pip install -q --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
      || echo "[browser] WARNING: pip install playwright failed" >&2
  fi
else
  echo "[browser] WARNING: $VENV_PY not found (run: bash scripts/lab.sh setup)" >&2
fi
exit 0
