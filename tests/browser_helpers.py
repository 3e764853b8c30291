"""Machinery for tests/test_browser.py: a throw-away JupyterLab server and Playwright helpers for its notebook UI.

Kept free of pytest fixtures so it can also be used from a plain script while debugging.
Everything runs on localhost; Chromium is Debian's (/usr/bin/chromium), driven by Playwright for Python
(scripts/install_browser.sh installs both; no browser is ever downloaded).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLICK_PANEL_CLASS = "difftrack-click-track"  # difftrack.click_track.PANEL_CLASS (no difftrack import here)
CHROMIUM = os.environ.get("DIFFTRACK_CHROMIUM", "/usr/bin/chromium")
# Headless Debian Chromium as known to work on these machines (closed network: no background connections).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
# Repository entries a notebook may read relative to notebooks/ ("../difftrack", "../results", ...). They are
# symlinked into the server's scratch root, except the ones below: outputs get fresh directories (results/ is
# copied) so a browser run never overwrites committed figures or numbers.
_NOT_MIRRORED = {".git", ".venv", "notebooks", "figures", "results", "build", "cache", ".pytest_cache"}

# What a failed notebook cell looks like in JupyterLab 4.6: error outputs are rendered with the stderr MIME type
# (no dedicated class); inside a widget Output area the Output widget's __exit__ prints the traceback there too.
ERROR_RE = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b|Error displaying widget",
                      re.MULTILINE)


def ci_is_set() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def browser_problems() -> list[str]:
    """Why the browser test cannot run here (empty list: it can)."""
    problems = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"Chromium not found at {CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("Playwright for Python is not installed in this interpreter")
    return problems


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_root(root: Path) -> Path:
    """Scratch Jupyter root that mirrors the repository: notebooks/ is a real directory (notebooks are copied in by
    prepare_notebook), figures/ and build/ are empty, results/ is a copy, everything else is a symlink."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in _NOT_MIRRORED or (root / entry.name).exists():
            continue
        (root / entry.name).symlink_to(entry)
    nbdir = root / "notebooks"
    nbdir.mkdir(exist_ok=True)
    src_nb = ROOT / "notebooks"
    if src_nb.is_dir():
        for entry in src_nb.iterdir():
            # not the notebooks' jupytext pairs (NN_name.py) nor their pairing config: JupyterLab's jupytext
            # extension would open a copy's cells from the repository's .py (dropping the injected parameters) and
            # write the copy's cells back into it on save
            paired = entry.suffix == ".py" and (src_nb / f"{entry.stem}.ipynb").exists()
            if (entry.suffix == ".ipynb" or paired or entry.name == "jupytext.toml" or entry.name.startswith(".")
                    or (nbdir / entry.name).exists()):
                continue
            (nbdir / entry.name).symlink_to(entry)
    for name in ("figures", "build"):
        (root / name).mkdir(exist_ok=True)
    if (ROOT / "results").is_dir() and not (root / "results").exists():
        shutil.copytree(ROOT / "results", root / "results", symlinks=True)
    (root / "results").mkdir(exist_ok=True)
    return nbdir


def prepare_notebook(src: Path, dest: Path, params: dict) -> dict:
    """Copy `src` to `dest` with papermill's --prepare-only, injecting those of `params` that the notebook's
    parameters cell defines (unknown names are dropped, so a renamed parameter never breaks the copy).
    Returns the parameters actually injected."""
    import papermill

    declared = {}
    if params:
        try:
            declared = papermill.inspect_notebook(str(src))
        except Exception:  # no parameters cell: nothing to inject
            declared = {}
    inject = {k: v for k, v in params.items() if k in declared}
    papermill.execute_notebook(str(src), str(dest), parameters=inject, prepare_only=True, kernel_name="python3",
                               progress_bar=False, log_output=False)
    return inject


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@dataclass
class LabServer:
    """A JupyterLab server on a free localhost port with a random token, isolated in `home` (config, runtime,
    settings, workspaces, IPython dir). `stop()` shuts it down (API, then SIGTERM, then SIGKILL) and kills any
    kernel it left behind; it is safe to call twice."""

    root: Path
    home: Path
    python: str = sys.executable
    port: int = 0
    token: str = ""
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "LabServer":
        self.port = self.port or free_port()
        self.token = self.token or os.urandom(16).hex()
        home = self.home
        settings = home / "lab-settings"
        # User settings: all cells attached to the DOM (the error scan and screenshots see every cell), start the
        # notebook's kernel without the "Select Kernel" dialog, and never ask about or fetch Jupyter news.
        _write_json(settings / "@jupyterlab/notebook-extension/tracker.jupyterlab-settings",
                    {"windowingMode": "none", "autoStartDefaultKernel": True})
        _write_json(settings / "@jupyterlab/apputils-extension/notification.jupyterlab-settings",
                    {"fetchNews": "false", "checkForUpdates": False})
        env = dict(os.environ)
        env.update({
            "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "IPYTHONDIR": str(home / "ipython"), "DIFFTRACK_ROOT": str(self.root),
            "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        })
        env.pop("MPLBACKEND", None)  # the notebooks use %matplotlib inline; Agg from lab.sh would not hurt either
        self.log_path = home / "jupyterlab.log"
        self._log = open(self.log_path, "w")
        cmd = [self.python, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--LabApp.extension_manager=readonly", "--LanguageServerManager.autodetect=False",
               "--ServerApp.open_browser=False"]
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"},
                                     data=b"" if method in ("POST",) else None)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def lab_url(self, relpath: str) -> str:
        return f"{self.url}/lab/tree/{relpath}?token={self.token}&reset"

    def shutdown_kernels(self) -> None:
        try:
            for s in self.api("GET", "/api/sessions") or []:
                self.api("DELETE", f"/api/sessions/{s['id']}")
        except Exception:
            pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except Exception:
            return "(no log)"

    def _leftover_pids(self) -> list[int]:
        """Kernels this server started: their command line names a connection file in our private runtime dir."""
        marker = str(self.home / "runtime")
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=5)
            except Exception:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=10)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.proc.wait(timeout=10)
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


# --------------------------------------------------------------------------------------------------------------
# Notebook UI helpers (Playwright sync API, JupyterLab 4.6 + ipywidgets 8 DOM)

STATUSBAR_IDLE_JS = "() => /\\|\\s*Idle\\b/.test((document.querySelector('#jp-main-statusbar') || {}).innerText || '')"


def kernel_idle(page) -> bool:
    return bool(page.evaluate(STATUSBAR_IDLE_JS))


def open_notebook(page, server: LabServer, relpath: str, timeout_s: float = 120) -> None:
    page.goto(server.lab_url(relpath), timeout=timeout_s * 1000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and "Select Kernel" in dialog.first.inner_text():
            dialog.first.locator(".jp-mod-accept").click()  # only if autoStartDefaultKernel did not apply
        if kernel_idle(page):
            return
        time.sleep(0.3)
    raise AssertionError(f"kernel of {relpath} did not become idle within {timeout_s:.0f} s "
                         f"(status bar: {page.locator('#jp-main-statusbar').inner_text()!r})")


def run_all_cells(page, timeout_s: float) -> float:
    """Run > Run All Cells from the main menu; wait until no cell is queued/running and the kernel is idle.
    Returns the seconds it took. (JupyterLab stops a run-all at the first failing cell.)"""
    t0 = time.monotonic()
    page.locator("#jp-menu-panel .lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu .lm-Menu-item", has_text="Run All Cells").first.click()
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).some(p => /\\S/.test("
        "p.innerText.replace(/[\\[\\]:\\s]/g, '')))", timeout=60_000)  # something got a [*] or a number
    stable = 0
    while time.monotonic() - t0 < timeout_s:
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        if kernel_idle(page) and not any("*" in p for p in prompts):
            stable += 1
            if stable >= 3:  # idle across ~1.5 s: not just the gap between two cells
                return time.monotonic() - t0
        else:
            stable = 0
        time.sleep(0.5)
    raise AssertionError(f"Run All Cells did not finish within {timeout_s:.0f} s")


def error_outputs(scope) -> list[str]:
    """Texts of outputs under `scope` (page or locator) that show an error: tracebacks in cell outputs and in
    widget Output areas, and widgets that failed to render."""
    texts = scope.locator(".jp-OutputArea-output").evaluate_all(
        "els => els.filter(e => !e.querySelector('.jp-OutputArea-output'))"
        ".map(e => (e.getAttribute('data-mime-type') || '') + '\\n' + e.innerText)")
    return [t.split("\n", 1)[1][:2000] for t in texts
            if t.startswith("application/vnd.jupyter.stderr") and ERROR_RE.search(t)
            or "Error displaying widget" in t]


def unexecuted_code_cells(page) -> list[int]:
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
    return [i for i, p in enumerate(prompts) if not re.search(r"\[\d+\]", p)]


def find_slider(page, pattern: str):
    """The first ipywidgets slider whose description label matches `pattern` (case-insensitive regex).
    Returns (slider, its notebook cell, label), or (None, None, all slider labels seen)."""
    found = page.evaluate(
        """() => { const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'));
                   return cells.flatMap((c, ci) => Array.from(c.querySelectorAll('.widget-slider')).map((s, si) =>
                     [ci, si, ((s.querySelector('.widget-label') || {}).innerText || '').trim()])); }""")
    for ci, si, label in found:
        if re.search(pattern, label, re.IGNORECASE):
            cell = page.locator(".jp-Notebook .jp-Cell").nth(ci)
            return cell.locator(".widget-slider").nth(si), cell, label
    return None, None, [label for _, _, label in found]


def slider_value(slider) -> str:
    return slider.locator(".widget-readout").first.inner_text().strip()


def move_slider(slider) -> tuple[str, str]:
    """Move the slider by one step like a keyboard user: focus the handle, ArrowRight (ArrowLeft at the maximum).
    continuous_update=False sliders send the value on this 'change'. Falls back to typing into the editable
    readout. Returns (old, new) readout values."""
    handle = slider.locator(".noUi-handle").first
    old = slider_value(slider)
    now, top = handle.get_attribute("aria-valuenow"), handle.get_attribute("aria-valuemax")
    at_max = now is not None and top is not None and float(now) >= float(top)
    handle.scroll_into_view_if_needed()
    handle.focus()
    handle.press("ArrowLeft" if at_max else "ArrowRight")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and slider_value(slider) == old:
        time.sleep(0.1)
    if slider_value(slider) == old:  # keyboard did not move it: type a neighbouring value into the readout
        target = str(int(float(old)) + (-1 if at_max else 1))
        readout = slider.locator(".widget-readout").first
        readout.click()
        readout.press("Control+a")
        readout.type(target)
        readout.press("Enter")
    return old, slider_value(slider)


def widget_images(cell) -> list[str]:
    """src of the images inside the widget Output areas of `cell` (data: URLs with the PNG in base64) and of its
    ipywidgets Image widgets (blob: URLs, a new one for each new value)."""
    return cell.locator(".widget-output img, img.widget-image").evaluate_all("els => els.map(e => e.src)")


def set_slider(slider, value: int) -> str:
    """Set an IntSlider by typing `value` into its editable readout (Enter sends it). Returns the new readout."""
    readout = slider.locator(".widget-readout").first
    readout.scroll_into_view_if_needed()
    readout.click()
    readout.press("Control+a")
    readout.type(str(value))
    readout.press("Enter")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and slider_value(slider) != str(value):
        time.sleep(0.1)
    return slider_value(slider)


def wait_for_text(locator, pattern: str, timeout_s: float, fail_pattern: str | None = None) -> str:
    """Poll `locator`'s inner text until it matches the regex `pattern` (or `fail_pattern`, or the timeout);
    returns the last text seen."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = locator.inner_text().strip()
        if re.search(pattern, text) or (fail_pattern and re.search(fail_pattern, text)):
            return text
        time.sleep(0.25)
    return text


def wait_for_new_figure(page, cell, before: list[str], timeout_s: float) -> tuple[list[str], list[str]]:
    """Poll until the widget figure in `cell` differs from `before` (and the kernel is idle), an error shows up
    in the cell, or the kernel has stayed idle for 20 s with nothing new. Returns (images, errors)."""
    t0 = time.monotonic()
    idle_since = None
    while time.monotonic() - t0 < timeout_s:
        imgs, errs = widget_images(cell), error_outputs(cell)
        idle = kernel_idle(page)
        if errs and idle:
            return imgs, errs
        if imgs and imgs != before and idle:
            time.sleep(0.5)  # let the last display message land, then re-read
            return widget_images(cell), error_outputs(cell)
        idle_since = (idle_since or time.monotonic()) if idle else None
        if idle_since is not None and time.monotonic() - idle_since > 20:
            break
        time.sleep(0.25)
    return widget_images(cell), error_outputs(cell)
