"""The notebooks as a person sees them: JupyterLab in headless Chromium, all cells run, widgets driven.

For each notebook: copy it (papermill --prepare-only, CI-sized parameters injected) into a scratch Jupyter root,
start JupyterLab on a free localhost port with a random token, open the notebook in Debian's Chromium through
Playwright, Run > Run All Cells, check that every code cell ran and no output shows an error, then move the sliders
("layer", "step"/"timestep", "frame", "prompt": each one the notebook has, at least those REQUIRED names) with the
keyboard and check that the figure in the widget's Output area (or Image widget) changed (different PNG) without an
error. Every notebook with sliders is driven (01-05; their slider cells use difftrack.sliders.slider_panel). In
notebook 04 the click-to-track widget (difftrack.click_track) is then cleared, its frame slider set to a later frame,
two points clicked on the frame, and the label must count two tracks queried at that frame, with the strip of frames
redrawn (screenshot: build/browser/browser_04_tracking_click.png). A screenshot of the
widget cell with the moved slider goes to figures/browser_<notebook>.png. JupyterLab (and its kernels) is shut down even when the test fails.

Run alone:   bash scripts/lab.sh browser            (= pytest -m browser tests)
Set-up:      bash scripts/install_browser.sh        (Debian chromium + pinned playwright; never `playwright install`)
Other notebooks (e.g. a copy with a broken callback):
             DIFFTRACK_BROWSER_NOTEBOOKS=/tmp/x/02_layer_analysis_broken.ipynb bash scripts/lab.sh browser
Without Chromium/Playwright the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import browser_helpers as bh

pytestmark = pytest.mark.browser

NOTEBOOKS = ["01_dataset", "02_layer_analysis", "03_timestep", "04_tracking", "05_cag"]
# CI-sized parameters injected into the copy JupyterLab opens (only names the parameters cell defines are used).
# Override with DIFFTRACK_BROWSER_PARAMS='{"name": value, ...}' (applies to every notebook).
PARAMS: dict[str, dict] = {
    # 01-03 share these (same per-video cache in the scratch root): 2 denoising steps, 4x4 query grid
    "01_dataset": {"num_steps": 2, "grid_size": 4, "pseudo_check_per_family": 2},
    # 2 denoising steps (the step slider still has two values), 4x4 query grid, no untrained-weights control
    "02_layer_analysis": {"num_steps": 2, "grid_size": 4, "untrained_control": False},
    # 2 x 2 precomputed (layer, step) runs for the sliders instead of 4 x 2; no FeatureTracker row in the table
    "03_timestep": {"num_steps": 2, "grid_size": 4},
    "04_tracking": {"slider_layers": [5, 8], "slider_steps": [-1, -25], "include_features": False},
    # 2 prompts (the prompt slider moves), one CAG scale, 2 denoising steps
    "05_cag": {"n_prompts": 2, "num_steps": 2, "scales": [1.0]},
}
# Slider description patterns (case-insensitive) and which sliders each notebook must have.
SLIDERS = {"layer": r"\blayer\b", "step": r"\b(time[ _-]?)?step\b", "frame": r"\bframe\b", "prompt": r"\bprompt\b"}
REQUIRED = {"01_dataset": ("frame",), "02_layer_analysis": ("layer", "step"), "03_timestep": ("layer",),
            "04_tracking": ("layer", "step"), "05_cag": ("prompt",)}

# Notebooks with the click-to-track widget (difftrack.click_track): after the sliders, the test picks a later frame
# with the widget's frame slider, clicks two points on the frame and waits until the label counts two tracks and the
# strip of frames with the tracks has been redrawn.
CLICK_NOTEBOOKS = {"04_tracking"}
CLICK_TIMEOUT = float(os.environ.get("DIFFTRACK_BROWSER_CLICK_TIMEOUT", "180"))  # per click: one DiffTracker call
RUN_TIMEOUT = float(os.environ.get("DIFFTRACK_BROWSER_RUN_TIMEOUT", "900"))
SLIDER_TIMEOUT = float(os.environ.get("DIFFTRACK_BROWSER_SLIDER_TIMEOUT", "120"))
FAILURE_DIR = bh.ROOT / "build" / "browser"
# Notebooks whose slider figure shows no generated video at the CI-sized parameters (02 inspects a world video below
# 50 steps, 03 draws curves, 04 tracks world videos): their screenshots are the README's.
SHOTS_IN_FIGURES = {"02_layer_analysis", "03_timestep", "04_tracking"}


def _notebook_cases():
    override = os.environ.get("DIFFTRACK_BROWSER_NOTEBOOKS", "").strip()
    if override:
        paths = [Path(p).expanduser().resolve() for p in override.split(",") if p.strip()]
        return [pytest.param(p, True, id=p.stem) for p in paths]
    return [pytest.param(bh.ROOT / "notebooks" / f"{n}.ipynb", False, id=n) for n in NOTEBOOKS]


def _known_name(stem: str) -> str | None:
    return next((n for n in NOTEBOOKS if stem.startswith(n)), None)


def _click_to_track(page, notebook: str, log: list[str]):
    """Clear the click-to-track panel, move its frame slider to a later frame, click two points on the frame and
    check that two tracks appear (label, frame and strip images redrawn, no error). Returns the panel locator."""
    panel = page.locator(f".{bh.CLICK_PANEL_CLASS}").first
    assert panel.count(), f"{notebook}: no click-to-track panel (.{bh.CLICK_PANEL_CLASS}) after Run All Cells"
    cell = page.locator(".jp-Notebook .jp-Cell").filter(has=page.locator(f".{bh.CLICK_PANEL_CLASS}")).first
    label = panel.locator(".difftrack-click-track-label").first
    frame_img = panel.locator("img.difftrack-click-track-frame").first
    strip_img = panel.locator("img.difftrack-click-track-strip").first
    panel.scroll_into_view_if_needed()
    start = label.inner_text().strip()
    panel.locator("button", has_text="clear").first.click()
    text = bh.wait_for_text(label, r"^0 tracks\b", 30)
    assert text.startswith("0 tracks"), f"{notebook}: 'clear' did not empty the click panel (label {text!r})"
    slider = panel.locator(".widget-slider").first
    top = int(float(slider.locator(".noUi-handle").first.get_attribute("aria-valuemax")))
    target = max(1, top - 2)  # a later frame, not the one the panel started on (the middle one)
    shown = frame_img.get_attribute("src")
    assert bh.set_slider(slider, target) == str(target), f"{notebook}: could not set the click panel's frame slider"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and frame_img.get_attribute("src") == shown:
        time.sleep(0.2)
    assert frame_img.get_attribute("src") != shown, f"{notebook}: frame {target} was not drawn in the click panel"
    strip_before = strip_img.get_attribute("src")
    box = frame_img.bounding_box()
    t0 = time.monotonic()
    for i, (fx, fy) in enumerate([(0.3, 0.4), (0.7, 0.65)], start=1):
        frame_img.click(position={"x": fx * box["width"], "y": fy * box["height"]})
        want = rf"^{i} tracks?:"
        text = bh.wait_for_text(label, want, CLICK_TIMEOUT, fail_pattern=r"tracking failed")
        assert re.match(want, text), (f"{notebook}: after click {i} on frame {target} the label reads {text!r} "
                                      f"(expected {i} track{'s' if i > 1 else ''}; within {CLICK_TIMEOUT:.0f} s)")
    assert text.count(f"(t={target},") == 2, f"{notebook}: the clicks were not queried at frame {target}: {text!r}"
    assert strip_img.get_attribute("src") != strip_before, f"{notebook}: the strip of frames was not redrawn"
    errors = bh.error_outputs(cell)
    assert not errors, f"{notebook}: the click panel's cell shows an error:\n" + "\n---\n".join(errors)
    log.append(f"click-to-track: {start!r} -> cleared -> frame {target}, two clicks -> {text!r} "
               f"({time.monotonic() - t0:.1f} s)")
    return panel


@pytest.fixture(scope="module")  # module: JupyterLab and Chromium are gone before the rest of the suite runs
def lab_server(tmp_path_factory):
    problems = bh.browser_problems()
    if problems:
        msg = ("browser test needs Debian's chromium and Playwright for Python: " + "; ".join(problems)
               + " (install both with: bash scripts/install_browser.sh)")
        if bh.ci_is_set():
            pytest.fail("CI is set, so not skipping: " + msg)
        pytest.skip(msg)
    base = tmp_path_factory.mktemp("jlab")
    server = bh.LabServer(root=base / "root", home=base / "home")
    bh.prepare_root(server.root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.log_path and server.log_path.exists():
            FAILURE_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copy(server.log_path, FAILURE_DIR / "jupyterlab.log")


@pytest.fixture(scope="module")
def chromium(lab_server):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=bh.CHROMIUM, headless=True, args=bh.CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@pytest.mark.parametrize("notebook, overridden", _notebook_cases())
def test_notebook_in_jupyterlab(notebook: Path, overridden: bool, request, tmp_path):
    if not notebook.exists():
        pytest.skip(f"{notebook.relative_to(bh.ROOT) if notebook.is_relative_to(bh.ROOT) else notebook} "
                    "does not exist yet")
    server = request.getfixturevalue("lab_server")
    browser = request.getfixturevalue("chromium")

    name = _known_name(notebook.stem)
    params = dict(PARAMS.get(name, {}))
    params.update(json.loads(os.environ.get("DIFFTRACK_BROWSER_PARAMS", "{}")))
    rel = f"notebooks/{notebook.stem}.ipynb"
    injected = bh.prepare_notebook(notebook, server.root / rel, params)
    # Only screenshots that show no live generated video go to figures/ (a CI-sized run generates with a few steps,
    # and figures/ never shows a video of fewer than 50 steps); the others stay in build/browser/.
    default_dir = bh.ROOT / "figures" if name in SHOTS_IN_FIGURES else FAILURE_DIR
    shot_dir = Path(os.environ.get("DIFFTRACK_BROWSER_FIGURES", "") or (tmp_path if overridden else default_dir))
    required = REQUIRED.get(name, ())

    context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(60_000)
    log = [f"{notebook.name}: injected {injected}"]
    try:
        t0 = time.monotonic()
        bh.open_notebook(page, server, rel)
        log.append(f"opened, kernel idle after {time.monotonic() - t0:.1f} s")
        took = bh.run_all_cells(page, RUN_TIMEOUT)
        log.append(f"Run All Cells: {took:.1f} s")

        errors = bh.error_outputs(page)
        assert not errors, f"{notebook.name}: cell output shows an error after Run All Cells:\n" + "\n---\n".join(errors)
        not_run = bh.unexecuted_code_cells(page)
        assert not not_run, f"{notebook.name}: code cells {not_run} did not run (Run All stopped early?)"

        moved = []
        for key, pattern in SLIDERS.items():
            slider, cell, label = bh.find_slider(page, pattern)
            if slider is None:
                assert key not in required, (f"{notebook.name}: no slider described like {pattern!r} "
                                             f"(slider labels seen: {label})")
                continue
            before = bh.widget_images(cell)
            assert before, f"{notebook.name}: no figure in the widget output of the {label!r} slider's cell"
            old, new = bh.move_slider(slider)
            assert new != old, f"{notebook.name}: could not move the {label!r} slider (stuck at {old})"
            after, errs = bh.wait_for_new_figure(page, cell, before, SLIDER_TIMEOUT)
            assert not errs, (f"{notebook.name}: moving {label!r} {old} -> {new} made the callback fail:\n"
                              + "\n---\n".join(errs))
            assert after, f"{notebook.name}: moving {label!r} {old} -> {new} left no figure in the widget output"
            assert after != before, (f"{notebook.name}: moving {label!r} {old} -> {new} did not change the figure "
                                     f"(the callback did not redraw)")
            log.append(f"slider {label!r}: {old} -> {new}, figure changed")
            moved.append((key, cell))
        assert moved, f"{notebook.name}: no slider found like {list(SLIDERS)}"

        errors = bh.error_outputs(page)
        assert not errors, f"{notebook.name}: an output shows an error after moving sliders:\n" + "\n---\n".join(errors)

        if name in CLICK_NOTEBOOKS:
            panel = _click_to_track(page, notebook.name, log)
            click_dir = Path(os.environ.get("DIFFTRACK_BROWSER_FIGURES", "")
                             or (tmp_path if overridden else FAILURE_DIR))
            click_dir.mkdir(parents=True, exist_ok=True)
            page.mouse.move(0, 0)
            panel.screenshot(path=str(click_dir / f"browser_{notebook.stem}_click.png"))
            log.append(f"screenshot: {click_dir / f'browser_{notebook.stem}_click.png'}")

        shot_dir.mkdir(parents=True, exist_ok=True)
        shot = shot_dir / f"browser_{notebook.stem}.png"
        cell = moved[0][1]
        cell.scroll_into_view_if_needed()
        page.mouse.move(0, 0)  # no hover highlight in the picture, and no active-cell toolbar:
        page.add_style_tag(content=".jp-cell-toolbar, .jp-toolbar-overlay { display: none !important; }")
        cell.screenshot(path=str(shot))
        log.append(f"screenshot: {shot}")
        print("\n".join(log))
    except BaseException:
        FAILURE_DIR.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(FAILURE_DIR / f"{notebook.stem}-failure.png"), full_page=True)
        except Exception:
            pass
        print("\n".join(log))
        print(f"failure screenshot: {FAILURE_DIR / (notebook.stem + '-failure.png')}; "
              f"JupyterLab log tail:\n{server.log_tail()}")
        raise
    finally:
        context.close()
        server.shutdown_kernels()
