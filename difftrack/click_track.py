"""Click-to-track (notebook 04): click points on any frame of a video, track them, see the tracks over the video.

:class:`ClickTrack` holds the state and does all the work, with no widget involved: the clicked queries
``float32 [N, 3] (t, x, y)`` in the video's pixels (edge convention, ``docs/conventions.md``; ``t`` any frame, so a
point may start after frame 0), the tracker call (any ``tracker(video, queries) -> (tracks, visible)`` callable, e.g.
:class:`difftrack.tracking.DiffTracker`), and the drawing: a frame with the tracks
(:func:`difftrack.viz_tracks.draw_tracks`, whole tracks, before and after each query frame) and a strip of frames.

:func:`click_track_panel` wires it for JupyterLab: a ``frame`` slider, the frame as an ``ipywidgets.Image`` that
takes clicks (``ipyevents.Event``, a front-end-only widget extension: no extra server), a ``clear`` button, a label
that counts the tracks, and a strip of frames with the tracks. Each click adds the query ``(frame, x, y)`` and tracks
that point (only the new one: a point's track does not depend on the other points). Everything is drawn in the
kernel (PNG bytes set on Image widgets, no ``with out:`` capture), so a headless run (papermill) builds the panel,
tracks the start points and completes without a front-end.

    state = ClickTrack(video, DiffTracker(pipe), scale=4)
    state.add(6, 20.0, 31.5); state.add(6, 44.0, 12.0)          # (t, x, y): two points on frame 6
    state.track()                                                # tracks float32 [2, T, 2], visible bool [2, T]
    display(click_track_panel(state, frame=6))                   # click more points in JupyterLab

``ipywidgets`` and ``ipyevents`` are imported inside :func:`click_track_panel` only: ``import difftrack`` never
needs them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import cv2
import numpy as np

from .checks import check_queries, check_video
from .viz import POINT_PALETTE, point_colours
from .viz_tracks import draw_tracks

__all__ = ["PALETTE", "ClickTrack", "click_track_panel", "encode_png", "event_to_point", "moving_points"]

PANEL_CLASS = "difftrack-click-track"  # CSS class of the panel (the browser test finds it by this)
PALETTE = POINT_PALETTE  # one colour per clicked point, in click order (the colour rule lives in difftrack.viz)


def event_to_point(event: Mapping, image_size: tuple[int, int], video_size: tuple[int, int]) -> tuple[float, float]:
    """``(x, y)`` video pixels (edge convention) of a click ``event`` on an image of ``image_size (h, w)`` pixels that
    shows a frame of ``video_size (H, W)``.

    ``event`` is the dict ``ipyevents`` sends: on an ``ipywidgets.Image`` its ``dataX``/``dataY`` are the clicked
    pixel of the image data (its natural size, whatever size it is displayed at); without them ``relativeX / 
    boundingRectWidth`` (and Y) give the fraction of the displayed image. The clicked pixel's centre is mapped to the
    video and clipped to ``[0, W] x [0, H]``.
    """
    h, w = (int(v) for v in image_size)
    H, W = (int(v) for v in video_size)
    if "dataX" in event and "dataY" in event:
        fx, fy = (float(event["dataX"]) + 0.5) / w, (float(event["dataY"]) + 0.5) / h
    elif {"relativeX", "relativeY", "boundingRectWidth", "boundingRectHeight"} <= set(event):
        bw, bh = float(event["boundingRectWidth"]), float(event["boundingRectHeight"])
        if bw <= 0 or bh <= 0:
            raise ValueError(f"click event on an image of displayed size {bw}x{bh}; expected a positive size")
        fx, fy = (float(event["relativeX"]) + 0.5) / bw, (float(event["relativeY"]) + 0.5) / bh
    else:
        raise ValueError(f"click event without coordinates (keys {sorted(event)}); expected dataX/dataY (ipyevents on "
                         "an ipywidgets Image) or relativeX/relativeY with boundingRectWidth/boundingRectHeight")
    return float(np.clip(fx * W, 0, W)), float(np.clip(fy * H, 0, H))


def moving_points(gt_tracks, gt_visible, frame: int, n: int = 2, min_dist: float | None = None) -> np.ndarray:
    """``float32 [n, 2] (x, y)``: start points for a demo of clicking on ``frame`` -- the ground-truth points
    (``gt_tracks [N, T, 2]``, ``gt_visible [N, T]``) visible at ``frame`` that move the most over the video, each at
    least ``min_dist`` px (default: a quarter of the tracks' spread) from the ones already picked, where they are at
    ``frame``. Fewer than ``n`` when fewer qualify."""
    tr = np.nan_to_num(np.asarray(gt_tracks, np.float32))
    vis = np.asarray(gt_visible, bool)
    motion = np.linalg.norm(tr - tr[:, :1], axis=-1).max(1)
    at = tr[:, int(frame)]
    if min_dist is None:
        min_dist = 0.25 * float(np.ptp(tr.reshape(-1, 2), axis=0).max()) if tr.size else 0.0
    picked: list[int] = []
    for i in np.argsort(-motion, kind="stable"):
        if vis[i, int(frame)] and all(np.linalg.norm(at[i] - at[j]) >= min_dist for j in picked):
            picked.append(int(i))
            if len(picked) == n:
                break
    return at[picked].astype(np.float32).reshape(-1, 2)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``uint8 [h, w, 3]`` RGB image."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image, np.uint8)[..., ::-1]))
    if not ok:
        raise ValueError(f"could not encode an image of shape {np.shape(image)} as PNG")
    return buf.tobytes()


class ClickTrack:
    """Clicked queries on a video, their tracks, and drawings of both (no widgets; see the module docstring).

    Args:
        video: ``uint8 [T, H, W, 3]`` RGB.
        tracker: ``tracker(video, queries float32 [n, 3] (t, x, y)) -> (tracks [n, T, 2] (x, y), visible [n, T])``.
        scale: integer enlargement of the drawn frames (nearest neighbour).
        trail: past positions joined by the drawn trail.
        strip_frames: frames in :meth:`strip_image` (evenly spaced, first and last included).
    """

    def __init__(self, video, tracker: Callable, scale: int = 4, trail: int = 5, strip_frames: int = 5):
        self.video = check_video(video, min_frames=2)
        self.tracker = tracker
        if isinstance(scale, bool) or int(scale) != scale or scale < 1:
            raise ValueError(f"scale={scale!r}; expected a positive int")
        self.scale, self.trail, self.strip_frames = int(scale), int(trail), int(strip_frames)
        T = self.video.shape[0]
        self._queries = np.zeros((0, 3), np.float32)
        self.tracks = np.zeros((0, T, 2), np.float32)
        self.visible = np.zeros((0, T), bool)
        self._drawn: np.ndarray | None = None
        self.tracker_calls = 0

    # ------------------------------------------------------------------------------------------- state
    @property
    def num_frames(self) -> int:
        return self.video.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the video."""
        return self.video.shape[1], self.video.shape[2]

    @property
    def image_size(self) -> tuple[int, int]:
        """``(h, w)`` of the drawn frames (the video's size times ``scale``)."""
        return self.video.shape[1] * self.scale, self.video.shape[2] * self.scale

    @property
    def queries(self) -> np.ndarray:
        """``float32 [N, 3] (t, x, y)``: the clicked points, in click order (a copy)."""
        return self._queries.copy()

    @property
    def pending(self) -> int:
        """Clicked points not tracked yet."""
        return len(self._queries) - len(self.tracks)

    def add(self, t: int, x: float, y: float) -> np.ndarray:
        """Add the query ``(t, x, y)`` (frame index, video pixels); checked like the tracker's queries. Returns it."""
        q = np.array([[t, x, y]], np.float32)
        H, W = self.size
        q, _ = check_queries(q, self.num_frames, H, W)  # t a frame index, (x, y) inside the frame
        self._queries = np.concatenate([self._queries, q])
        self._drawn = None
        return q[0]

    def add_event(self, event: Mapping, t: int) -> np.ndarray:
        """Add the point of a click ``event`` (see :func:`event_to_point`) on the drawn frame ``t``."""
        x, y = event_to_point(event, self.image_size, self.size)
        return self.add(t, x, y)

    def clear(self) -> None:
        """Forget every query and track."""
        T = self.num_frames
        self._queries = np.zeros((0, 3), np.float32)
        self.tracks, self.visible = np.zeros((0, T, 2), np.float32), np.zeros((0, T), bool)
        self._drawn = None

    def track(self) -> tuple[np.ndarray, np.ndarray]:
        """Track the points added since the last call (one tracker call; none when nothing is pending) and return
        all ``(tracks float32 [N, T, 2], visible bool [N, T])``."""
        n = self.pending
        if n:
            new = self._queries[-n:]
            tr, vis = self.tracker(self.video, new)
            tr, vis = np.asarray(tr, np.float32), np.asarray(vis, bool)
            if tr.shape != (n, self.num_frames, 2) or vis.shape != (n, self.num_frames):
                raise ValueError(f"the tracker returned tracks {tr.shape} and visible {vis.shape} for {n} queries; "
                                 f"expected {(n, self.num_frames, 2)} and {(n, self.num_frames)}")
            self.tracker_calls += 1
            self.tracks = np.concatenate([self.tracks, tr])
            self.visible = np.concatenate([self.visible, vis])
            self._drawn = None
        return self.tracks, self.visible

    # ------------------------------------------------------------------------------------------- drawing
    @staticmethod
    def colors(n: int) -> np.ndarray:
        """``uint8 [n, 3]`` RGB of the first ``n`` clicked points (:func:`difftrack.viz.point_colours`)."""
        return point_colours(n)

    def _drawn_video(self) -> np.ndarray:
        if self._drawn is None:
            n = len(self.tracks)
            if n:
                # whole tracks (the tracker also follows a point backwards from its query frame)
                drawn = draw_tracks(self.video, self.tracks, self.visible, trail=self.trail, scale=self.scale,
                                    query_frames=np.zeros(n, np.int64), colors=self.colors(n))
            else:
                drawn = np.repeat(np.repeat(self.video, self.scale, axis=1), self.scale, axis=2)
            self._drawn = np.ascontiguousarray(drawn)
        return self._drawn

    def _mark_queries(self, img: np.ndarray, t: int, thick: int = 1) -> None:
        """White rings with a dark edge where points were clicked on frame ``t`` (pending ones as well)."""
        r = max(3, self.scale + 2)
        for qt, x, y in self._queries:
            if int(qt) != t:
                continue
            c = (round(float(x) * self.scale - 0.5), round(float(y) * self.scale - 0.5))
            cv2.circle(img, c, r + 1, (0, 0, 0), thick + 1, cv2.LINE_AA)
            cv2.circle(img, c, r, (255, 255, 255), thick, cv2.LINE_AA)

    def frame_image(self, t: int) -> np.ndarray:
        """``uint8 [H * scale, W * scale, 3]``: frame ``t`` with the tracks drawn (trails up to ``t``) and rings where
        points were clicked on this frame."""
        if not 0 <= int(t) < self.num_frames:
            raise ValueError(f"frame {t}; allowed: 0..{self.num_frames - 1}")
        img = self._drawn_video()[int(t)].copy()
        self._mark_queries(img, int(t))
        return img

    def strip_indices(self) -> list[int]:
        T = self.num_frames
        return np.unique(np.linspace(0, T - 1, min(self.strip_frames, T)).round().astype(int)).tolist()

    def strip_image(self, frames: list[int] | None = None, gap: int = 4) -> np.ndarray:
        """``uint8 [H * scale + 14, ...]``: frames (default :meth:`strip_indices`) with the tracks, side by side,
        each labelled with its index."""
        frames = self.strip_indices() if frames is None else [int(f) for f in frames]
        h, w = self.image_size
        band = 14
        parts = []
        for i, f in enumerate(frames):
            tile = np.full((h + band, w, 3), 255, np.uint8)
            tile[band:] = self.frame_image(f)
            cv2.putText(tile, f"frame {f}", (2, band - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
            parts += ([np.full((h + band, gap, 3), 255, np.uint8)] if i else []) + [tile]
        return np.concatenate(parts, axis=1)

    def figure(self, title: str | None = None, panel_size: float = 2.8):
        """A matplotlib Figure: the frames of :meth:`strip_indices` with the tracks, one panel each (for a static
        notebook cell; not shown)."""
        import matplotlib.pyplot as plt

        frames = self.strip_indices()
        fig, axes = plt.subplots(1, len(frames), figsize=(panel_size * len(frames), panel_size + 0.5), squeeze=False)
        for ax, f in zip(axes[0], frames):
            ax.imshow(self.frame_image(f), interpolation="nearest")
            ax.set_title(f"frame {f}" + (" (clicked)" if (self._queries[:, 0] == f).any() else ""), fontsize=9)
            ax.set_axis_off()
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig

    def describe(self) -> str:
        """One line: how many tracks, and the queries."""
        n = len(self.tracks)
        pts = ", ".join(f"(t={int(t)}, x={x:.1f}, y={y:.1f})" for t, x, y in self._queries)
        head = f"{n} track{'s' if n != 1 else ''}"
        if self.pending:
            head += f" ({self.pending} point{'s' if self.pending != 1 else ''} being tracked)"
        return head + (f": {pts}" if pts else ": click the frame to add a point")


def click_track_panel(state: ClickTrack, frame: int = 0, max_width: int = 768):
    """The JupyterLab widget of ``state`` (a :class:`ClickTrack`): a ``frame`` slider, a ``clear`` button and a
    label above the clickable frame, a strip of frames with the tracks below. A click on the frame adds the point at
    the slider's frame and tracks it; points not tracked yet in ``state`` are tracked here first. The frame is shown
    at its drawn size, or scaled down to ``max_width`` CSS pixels (clicks map to video pixels either way).

    Returns an ``ipywidgets.VBox`` (CSS class ``difftrack-click-track``) with attributes ``state``, ``frame_slider``,
    ``image``, ``strip``, ``label``, ``clear_button``, ``events`` (the ``ipyevents.Event``) and
    ``handle_event(event)``, what a click calls (tests call it with a dict like ipyevents' one).
    """
    import ipywidgets as widgets
    from ipyevents import Event

    if not isinstance(state, ClickTrack):
        raise TypeError(f"click_track_panel takes a ClickTrack; got {type(state).__name__}")
    T = state.num_frames
    if not 0 <= int(frame) < T:
        raise ValueError(f"frame={frame}; allowed: 0..{T - 1}")
    state.track()
    h, w = state.image_size
    slider = widgets.IntSlider(value=int(frame), min=0, max=T - 1, description="frame", continuous_update=False)
    clear = widgets.Button(description="clear", tooltip="forget every clicked point")
    label = widgets.Label(value=state.describe())
    label.add_class("difftrack-click-track-label")
    shown_w = min(w, int(max_width))
    image = widgets.Image(format="png", layout=widgets.Layout(width=f"{shown_w}px",
                                                              height=f"{round(h * shown_w / w)}px"))
    image.add_class("difftrack-click-track-frame")
    strip = widgets.Image(format="png")
    strip.add_class("difftrack-click-track-strip")
    events = Event(source=image, watched_events=["click"], prevent_default_action=True)

    def redraw(change=None) -> None:
        image.value = encode_png(state.frame_image(slider.value))
        strip.value = encode_png(state.strip_image())
        label.value = state.describe()

    def handle_event(event: Mapping) -> None:
        if event.get("type", "click") != "click":
            return
        try:
            state.add_event(event, slider.value)
            image.value = encode_png(state.frame_image(slider.value))  # the ring shows at once
            label.value = state.describe()
            state.track()
        except Exception as exc:  # noqa: BLE001 -- shown to the person clicking; nobody else to raise to
            label.value = f"tracking failed: {type(exc).__name__}: {exc}"
            return
        redraw()

    def on_clear(_button=None) -> None:
        state.clear()
        redraw()

    slider.observe(redraw, names="value")
    clear.on_click(on_clear)
    events.on_dom_event(handle_event)
    redraw()
    panel = widgets.VBox([widgets.HBox([slider, clear, label]), image, strip])
    panel.add_class(PANEL_CLASS)
    panel.state, panel.frame_slider, panel.image, panel.strip = state, slider, image, strip
    panel.label, panel.clear_button, panel.events, panel.handle_event = label, clear, events, handle_event
    panel.redraw = redraw
    return panel
