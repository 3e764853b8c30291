"""difftrack.sliders.slider_panel: what a draw puts into the Output widget, redraws on slider moves, errors, leaks.

These run the helper in this process (ipywidgets without a kernel: widget state changes are plain trait changes);
tests/test_headless_sliders.py runs it in real kernels through papermill.
"""
from __future__ import annotations

import base64
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

widgets = pytest.importorskip("ipywidgets")
from difftrack.sliders import slider_panel  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fig(value: int, pyplot: bool = False):
    fig = plt.figure(figsize=(2, 2)) if pyplot else Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [0, value, value * value])
    ax.set_title(f"value {value}")
    return fig


def _pngs(panel) -> list[bytes]:
    out = panel.children[1]
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in out.outputs
            if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    return pngs


def _kinds(panel) -> list[str]:
    return [o["output_type"] + (":" + o["name"] if o["output_type"] == "stream" else "")
            for o in panel.children[1].outputs]


@pytest.fixture
def shell():
    """An IPython shell as in a kernel, so display() goes through its display publisher."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    yield sh
    InteractiveShell.clear_instance()


def test_returned_figure_is_png_and_redraws_on_slider_move():
    s = widgets.IntSlider(value=1, min=0, max=5, description="layer")
    calls = []

    def fn(layer):
        calls.append(layer)
        return _fig(layer)

    panel = slider_panel(fn, {"layer": s})
    out = panel.children[1]
    assert isinstance(out, widgets.Output) and s in panel.children[0].children
    assert calls == [1]
    first = _pngs(panel)
    assert len(first) == 1 and _kinds(panel) == ["display_data"]
    s.value = 3
    assert calls == [1, 3]
    second = _pngs(panel)
    assert len(second) == 1 and second != first
    # the kernel set the outputs itself: the Output was never entered (no frontend capture, no msg_id)
    assert out.msg_id == ""


def test_tuple_print_and_several_controls():
    a = widgets.IntSlider(value=1, min=0, max=3, description="layer")
    b = widgets.Dropdown(options=["x", "y"], value="x", description="set")

    def fn(layer, name):
        print(f"drawing {layer} {name}")
        return _fig(layer), _fig(layer + 1)

    panel = slider_panel(fn, {"layer": a, "name": b})
    assert _kinds(panel) == ["stream:stdout", "display_data", "display_data"]
    assert panel.children[1].outputs[0]["text"] == "drawing 1 x\n"
    before = _pngs(panel)
    b.value = "y"
    assert panel.children[1].outputs[0]["text"] == "drawing 1 y\n"
    assert _pngs(panel) == before  # same layer: same figures
    a.value = 2
    assert _pngs(panel) != before


def test_display_calls_are_collected_in_order_and_return_value_ignored(shell):
    from IPython.display import HTML, display

    s = widgets.IntSlider(value=0, min=0, max=2, description="step")

    def fn(step):
        display(HTML(f"<b>step {step}</b>"))
        fig = _fig(step)
        display(fig)
        return fig  # displayed already: not shown a second time

    panel = slider_panel(fn, {"step": s})
    outs = panel.children[1].outputs
    assert _kinds(panel) == ["display_data", "display_data"]
    assert outs[0]["data"]["text/html"] == "<b>step 0</b>"
    assert len(_pngs(panel)) == 1
    s.value = 2
    assert panel.children[1].outputs[0]["data"]["text/html"] == "<b>step 2</b>"
    # the shell's own publisher and formatter are back in place after each draw
    assert "publish" not in vars(shell.display_pub) and "format" not in vars(shell.display_formatter)


def test_pyplot_figures_are_shown_once_and_closed():
    plt.close("all")
    keep = plt.figure()  # a figure the notebook had before: left alone
    s = widgets.IntSlider(value=1, min=0, max=9, description="step")

    def returns_pyplot(step):
        return _fig(step, pyplot=True)

    def leaves_open(step):
        _fig(step, pyplot=True)
        _fig(step + 1, pyplot=True)

    for fn in (returns_pyplot, leaves_open):
        panel = slider_panel(fn, {"step": s})
        for v in range(2, 8):
            s.value = v
            assert len(_pngs(panel)) == (1 if fn is returns_pyplot else 2)
        assert plt.get_fignums() == [keep.number], f"{fn.__name__} leaked pyplot figures"
        s.unobserve_all()
    plt.close("all")


def test_broken_callback_shows_its_error_and_recovers():
    s = widgets.IntSlider(value=0, min=0, max=3, description="layer")

    def fn(layer):
        if layer == 2:
            raise ValueError("no attention maps for layer 2")
        return _fig(layer)

    panel = slider_panel(fn, {"layer": s})
    assert len(_pngs(panel)) == 1
    s.value = 2  # must return (not hang) with the error in the panel
    (err,) = panel.children[1].outputs
    assert err["output_type"] == "error" and err["ename"] == "ValueError"
    assert "no attention maps for layer 2" in err["evalue"] and "layer=2" in err["evalue"]
    assert any("Traceback (most recent call last)" in line for line in err["traceback"])
    assert any("no attention maps for layer 2" in line for line in err["traceback"])
    s.value = 3
    assert _kinds(panel) == ["display_data"] and len(_pngs(panel)) == 1


def test_broken_first_draw_raises():
    s = widgets.IntSlider(value=4, min=0, max=5, description="layer")

    def show_layer(layer):
        raise KeyError(layer)

    with pytest.raises(RuntimeError, match=r"show_layer\(layer=4\) failed on the first draw: KeyError"):
        slider_panel(show_layer, {"layer": s})


def test_bad_controls_are_rejected():
    with pytest.raises(ValueError):
        slider_panel(lambda: None, {})
    with pytest.raises(TypeError, match="not ipywidgets value widgets"):
        slider_panel(lambda layer: None, {"layer": 3})


def test_library_import_does_not_import_ipywidgets():
    import subprocess

    code = "import difftrack, difftrack.sliders, difftrack.viz, sys; print('ipywidgets' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
