"""Slider panels for the notebooks, drawn in the kernel so that headless runs (papermill, nbclient) never stall.

``slider_panel(fn, {"layer": layer_slider, "step": step_slider})`` replaces the usual

    out = widgets.interactive_output(fn, {...})
    display(widgets.HBox([...]), out)

Why not ``interactive_output``: it draws inside ``with out:``, so the kernel sends every figure as an ordinary
``display_data`` message of the running cell and leaves it to the frontend to route it into the Output widget.
nbclient (hence papermill) imitates that frontend and, for each captured output (and for each ``clear_output``),
sends a ``comm_msg`` back to the kernel on the shell socket while it waits on that same socket for the cell's
``execute_reply``; that send can swallow the reply's wake-up, and the cell then waits until the execution timeout
(jupyter/nbclient#312, jupyter_client#1059). ``Output.clear_output()`` goes through the same capture path
(``with self: clear_output()``). Here the kernel collects what the callback shows and assigns the Output widget's
``outputs`` trait itself, in one assignment per draw: the frontend (JupyterLab, or nbclient) only receives a widget
state update on IOPub and never has to answer on the shell socket, and JupyterLab redraws the Output from that
update exactly as before.

What a draw shows, in this order of rules:

* everything the callback displays while it runs -- ``display(obj)``, ``plt.show()`` under the inline backend,
  ``print`` and writes to ``sys.stderr`` (as stream outputs), in the order they happen; ``clear_output()`` inside
  the callback drops what was collected so far;
* if it displayed nothing (printing does not count), its return value: ``None`` shows nothing, a matplotlib
  ``Figure`` is shown as a PNG, a ``tuple`` or ``list`` shows each of its items in order, anything else is shown
  with IPython's rich display (its ``_repr_png_``/``_repr_html_``/``repr``). A callback that displays something
  has its return value ignored, as with ``interactive_output`` (so ``plt.show(); return fig`` shows it once);
* pyplot figures the callback opened and left open without showing them are shown last, like
  ``interactive_output`` flushes them (a figure is never shown twice).

Matplotlib figures are rendered to PNG in the kernel (IPython's ``print_figure``, ``bbox_inches="tight"``, the
inline backend's settings), and every pyplot figure the callback opened is closed after the draw, so moving a
slider never accumulates figures. A callback that raises during a slider move shows its traceback in the panel (an
``error`` output; the kernel stays responsive); on the first draw, when the panel is built, the exception propagates
so a headless run or "Run All" fails at the cell instead of leaving a panel with an error in it.

ipywidgets is imported inside the functions: ``import difftrack`` never needs it.
"""
from __future__ import annotations

import contextlib
import io
import sys
import traceback
from typing import Any, Callable, Mapping

__all__ = ["slider_panel", "render_outputs"]


class _StreamCollector(io.TextIOBase):
    """A text stream that appends what is written to ``items`` as nbformat stream outputs (merged with the previous
    output when that is the same stream, as frontends do)."""

    def __init__(self, items: list, name: str):
        self._items, self.name = items, name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            last = self._items[-1] if self._items else None
            if last is not None and last["output_type"] == "stream" and last["name"] == self.name:
                last["text"] += text
            else:
                self._items.append({"output_type": "stream", "name": self.name, "text": text})
        return len(text)


def _shell():
    """The running IPython shell (the kernel's), or None outside IPython."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        return None
    return InteractiveShell.instance() if InteractiveShell.initialized() else None


def _is_figure(obj) -> bool:
    mpl = sys.modules.get("matplotlib.figure")
    return mpl is not None and isinstance(obj, mpl.Figure)


def _figure_output(fig) -> dict | None:
    from IPython.core.pylabtools import print_figure

    png = print_figure(fig, "png", bbox_inches="tight", base64=True)
    if png is None:  # an empty figure (no axes): nothing to show, like the inline backend
        return None
    return {"output_type": "display_data", "data": {"image/png": png, "text/plain": repr(fig)}, "metadata": {}}


def _object_output(obj) -> dict | None:
    """One display_data output for ``obj``: a matplotlib Figure as PNG, anything else through IPython's display
    formatter (the kernel's when there is one)."""
    if obj is None:
        return None
    if _is_figure(obj):
        return _figure_output(obj)
    shell = _shell()
    if shell is not None:
        data, metadata = shell.display_formatter.format(obj)
    else:
        from IPython.core.formatters import DisplayFormatter

        data, metadata = DisplayFormatter().format(obj)
    if not data:
        return None
    return {"output_type": "display_data", "data": data, "metadata": metadata}


def render_outputs(value) -> list[dict]:
    """nbformat outputs for a callback's return value: None -> [], a tuple/list -> one output per item, anything
    else (a Figure included) -> one output."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    return [o for o in (_object_output(v) for v in items) if o is not None]


@contextlib.contextmanager
def _collect_displays(items: list, shown: set):
    """While active, ``display(...)``/``clear_output()`` calls of the running IPython shell, ``print`` and stderr
    writes are appended to ``items`` instead of being sent to the frontend; ``shown`` gets the ids of the objects
    displayed. Matplotlib figures passed to ``display`` are rendered to PNG here whatever the backend settings."""
    shell = _shell()
    pub = shell.display_pub if shell is not None else None
    fmt = shell.display_formatter if shell is not None else None
    original_format = fmt.format if fmt is not None else None

    def publish(data, metadata=None, *args, **kwargs):
        items.append({"output_type": "display_data", "data": dict(data), "metadata": dict(metadata or {})})

    def clear_output(*args, **kwargs):
        items.clear()

    def format(obj, *args, **kwargs):
        shown.add(id(obj))
        if _is_figure(obj):
            out = _figure_output(obj)
            return (out["data"], out["metadata"]) if out is not None else ({}, {})
        return original_format(obj, *args, **kwargs)

    if pub is not None:  # instance attributes shadow the methods until they are popped again
        pub.publish, pub.clear_output, fmt.format = publish, clear_output, format
    try:
        with contextlib.redirect_stdout(_StreamCollector(items, "stdout")), \
                contextlib.redirect_stderr(_StreamCollector(items, "stderr")):
            yield
    finally:
        if pub is not None:
            for obj, name in ((pub, "publish"), (pub, "clear_output"), (fmt, "format")):
                vars(obj).pop(name, None)


def _pyplot_figures() -> dict:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return {}
    return {n: plt.figure(n) for n in plt.get_fignums()}


def _draw(fn: Callable, kwargs: dict) -> list[dict]:
    """Call ``fn(**kwargs)`` and return what it shows as nbformat outputs (see the module docstring). Exceptions
    propagate; the pyplot figures it opened are closed either way."""
    items: list[dict] = []
    shown: set[int] = set()
    before = set(_pyplot_figures())
    try:
        with _collect_displays(items, shown):
            value = fn(**kwargs)
        if not any(o["output_type"] == "display_data" for o in items):
            items.extend(render_outputs(value))
            shown.update(id(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
        for n, fig in _pyplot_figures().items():  # opened by fn, still open, not shown: show it (and close it below)
            if n not in before and id(fig) not in shown:
                out = _figure_output(fig)
                if out is not None:
                    items.append(out)
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            for n in set(plt.get_fignums()) - before:
                plt.close(n)
    return items


def _error_output(exc: BaseException, kwargs: dict) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    values = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return {"output_type": "error", "ename": type(exc).__name__, "evalue": f"{exc} (slider values: {values})",
            "traceback": [line.rstrip("\n") for line in "".join(tb).splitlines()]}


def slider_panel(fn: Callable[..., Any], controls: Mapping[str, Any]):
    """A widget with ``controls`` (ipywidgets value widgets: sliders, dropdowns, ...) in a row above an Output area
    that shows ``fn(**{name: control.value})``, redrawn whenever a control's value changes.

    ``fn`` may return a matplotlib Figure, a tuple/list of objects, or None after calling ``display``/``plt.show``
    itself (see the module docstring for exactly what is shown). The Output's contents are set by the kernel
    (``Output.outputs``), never captured with ``with out:``, so nbclient/papermill does not stall on the cell.

    The first draw happens here; if ``fn`` raises, the exception propagates (with the control values in the
    message chain). A later draw that raises shows the traceback in the Output instead.
    Returns an ``ipywidgets.VBox([HBox(controls), Output])``; display it (or make it the cell's last expression).
    The Output is ``panel.children[1]``; ``panel.redraw()`` draws again with the current values.
    """
    import ipywidgets as widgets

    if not controls:
        raise ValueError("slider_panel needs at least one control")
    bad = [k for k, c in controls.items() if not (isinstance(c, widgets.Widget) and c.has_trait("value"))]
    if bad:
        raise TypeError(f"slider_panel: controls {bad} are not ipywidgets value widgets")
    out = widgets.Output()

    def values() -> dict:
        return {k: c.value for k, c in controls.items()}

    def redraw(change=None) -> None:
        kwargs = values()
        try:
            outputs = _draw(fn, kwargs)
        except Exception as exc:  # noqa: BLE001 -- shown to the person moving the slider; nobody else to raise to
            outputs = [_error_output(exc, kwargs)]
        out.outputs = tuple(outputs)

    kwargs = values()
    try:
        first = _draw(fn, kwargs)
    except Exception as exc:
        call = f"{getattr(fn, '__name__', fn)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        raise RuntimeError(f"slider_panel: {call} failed on the first draw: {type(exc).__name__}: {exc}") from exc
    out.outputs = tuple(first)
    for c in controls.values():
        c.observe(redraw, names="value")
    panel = widgets.VBox([widgets.HBox(list(controls.values())), out])
    panel.redraw = redraw
    return panel
