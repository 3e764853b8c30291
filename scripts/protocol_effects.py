"""How far each defect of the published code moves the published protocol's numbers (issue 29).

    python scripts/protocol_effects.py                       # synthetic + embedded model, CPU, a few minutes
    python scripts/protocol_effects.py --videos 4 --synthetic 3 --out results/protocol_effects.json

The reference is the published protocol with its defects fixed (:mod:`difftrack.analysis`, ``protocol="published"``:
argmax per source token + bilinear match-map interpolation in cell-centre units with border clamping, latent-frame
tracks linearly interpolated to every video frame, all frames scored, frame 0 included, scores at sqrt(head_dim)).
Each defect is then put back alone, written here from the shared reference's description (sections 4.3, 7, 11):

* ``[B4]`` coordinate hack: the match map sampled at ``(x/s)(w-1)/(w-m')`` (``m' = W / (64 s)`` cells, both axes),
  zero padding, cell-corner output ``16 c``;
* ``extra_softmax``: a softmax over the cost (already probabilities) in float32 before the argmax;
* ``[B3]`` transposed query token in the confidence / attention scores: ``[x_pos, y_pos]`` with
  ``x_pos = clip(round(x/s), 0, h-1)``, ``y_pos = clip(round(y/s), 0, w-1)``;
* ``[B2]`` tracking temperature sqrt(num_heads) instead of sqrt(head_dim): the published **tracking** numbers,
  delta_avg (TAP-Vid thresholds 1, 2, 4, 8, 16 px at 256x256, frames after the query, points visible at frame 0);
* chunk plan: the published chunk loop vs the project's (:func:`difftrack.tracking.plan_chunks`): the chunks for
  the published video lengths, and delta_avg of :class:`difftrack.tracking.DiffTracker` on 30-frame world videos
  (the lengths where the two plans differ).

Also measured, on identical query/key: the two protocols' own differences (refinement soft-argmax vs argmax +
interpolation; frames scored: latent frames 1.. with AND visibility vs every video frame, frame 0 included).

Two inputs: synthetic query/key in the published layout (CogVideoX-2B: 13 latent frames of 30x45 tokens, 226 text
tokens, 30 heads x 64, 480x720, 49 video frames, a 20x20 CoTracker grid; descriptors are random Fourier features of
the world position under a known non-linear motion, so the ground truth is exact) and the embedded model (world videos
with exact ground truth, noised to the last of 50 steps, every layer; latent frames are video frames there, so the
temporal interpolation is the identity). Writes ``--out`` (device, commit, settings, every number).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

from difftrack import analysis as A  # noqa: E402
from difftrack import matching as M  # noqa: E402
from difftrack.experiments import json_clean, write_json  # noqa: E402
from difftrack.provenance import device_name, git_commit  # noqa: E402

THRESHOLDS_256 = (1, 2, 4, 8, 16)


# ---------------------------------------------------------------------------------------------- one layer
class Layer:
    """One layer's query/key ``[H, N, D]`` with its layout, the queries and the per-video-frame ground truth."""

    def __init__(self, q, k, frames, rows, cols, text, stride, width, height, queries, gt, vis, temporal):
        self.q, self.k = q, k
        self.F, self.rows, self.cols, self.text, self.s = frames, rows, cols, text, stride
        self.W, self.Hpx = width, height
        self.queries, self.gt, self.vis, self.r = queries, gt, vis, temporal
        H, N, D = q.shape
        v = slice(text, text + frames * rows * cols)
        self.qv = q[:, v].reshape(H, frames, rows * cols, D)
        self.kv = k[:, v].reshape(H, frames, rows * cols, D)

    def costs(self, tau) -> torch.Tensor:
        """``[F - 1, M, M]``: frame 0 against frames 1.., bidirectional."""
        return M.qk_cost_frames(self.qv[:, 0], self.kv[:, 0], self.qv[:, 1:], self.kv[:, 1:], tau, head_chunk=2)

    def tracks(self, costs, variant="fixed") -> np.ndarray:
        """Latent-frame tracks ``[n, F, 2]`` px from argmax match maps."""
        pts_px = torch.from_numpy(self.queries).float()
        out = [pts_px]
        for c in costs:
            if variant == "extra_softmax":
                c = torch.softmax(c.float(), -1)
            if variant == "B4":
                idx = c.argmax(-1)
                mm = torch.stack([(idx % self.cols).float(), (idx // self.cols).float()], 0)
                mm = mm.view(1, 2, self.rows, self.cols)
                m = self.W / (64 * self.s)  # the published margin, in cells, for both axes
                g = torch.stack([(pts_px[:, 0] / self.s) / (self.cols - m) * 2 - 1,
                                 (pts_px[:, 1] / self.s) / (self.rows - m) * 2 - 1], -1).view(1, 1, -1, 2)
                pos = Fn.grid_sample(mm, g, mode="bilinear", padding_mode="zeros", align_corners=True)[0, :, 0].T
                out.append(pos * self.s)  # cell-corner convention
            else:
                pos, _ = M.match_from_cost(c, self.rows, self.cols, M.px_to_tokens(pts_px, self.s), refine="paper")
                out.append(M.tokens_to_px(pos, self.s))
        return torch.stack(out, 1).numpy()

    def soft_tracks(self, costs) -> np.ndarray:
        pts_px = torch.from_numpy(self.queries).float()
        tok = M.px_to_tokens(pts_px, self.s)
        out = [pts_px] + [M.tokens_to_px(M.match_from_cost(c, self.rows, self.cols, tok, "softargmax")[0], self.s)
                          for c in costs]
        return torch.stack(out, 1).numpy()

    def published_acc(self, tracks) -> float:
        d = np.linalg.norm(A.interpolate_frames(tracks, self.gt.shape[1]) - self.gt, axis=-1)
        return float(((d < self.s / 2) & self.vis).sum() / max(self.vis.sum(), 1))

    def difftrack_acc(self, tracks) -> float:
        """The project's frames: latent frames 1.. pinned to video frames r k, AND visibility."""
        from difftrack.runners import latent_visibility

        idx = np.arange(self.F) * self.r
        v = latent_visibility(self.vis, self.r, self.F)
        v[:, 0] = False
        d = np.linalg.norm(tracks - self.gt[:, idx], axis=-1)
        return float(((d < self.s / 2) & v).sum() / max(v.sum(), 1))

    def scores(self, variant="fixed") -> dict:
        x, y = self.queries[:, 0], self.queries[:, 1]
        if variant == "B3":
            xp = np.clip(np.round(x / self.s), 0, self.rows - 1).astype(int)  # rows indexed by x
            yp = np.clip(np.round(y / self.s), 0, self.cols - 1).astype(int)
            tok = xp * self.cols + yp
        else:
            tok = (np.clip(np.floor(y / self.s), 0, self.rows - 1) * self.cols
                   + np.clip(np.floor(x / self.s), 0, self.cols - 1)).astype(int)
        att = M.attention_rows(self.q, self.k, torch.from_numpy(self.text + tok), tau="dim", head_chunk=2).numpy()
        n = len(tok)
        video = att[:, self.text:self.text + self.F * self.rows * self.cols].reshape(n, self.F, -1)
        from difftrack.runners import latent_visibility

        p = A.score_parts(att[None, None, :, :self.text].max(-1) if self.text else np.zeros((1, 1, n)),
                          att[None, None, :, :self.text].sum(-1), video.max(-1)[None, None], video.sum(-1)[None, None],
                          latent_visibility(self.vis, self.r, self.F))
        return {k: float(v[0, 0]) for k, v in p.items()}

    def delta_avg(self, tracks) -> float:
        """TAP-Vid delta_avg of latent-frame tracks against the ground truth at the frames they encode (the tracking
        protocol: frames after the query, points visible at frame 0, 256x256 space)."""
        idx = np.arange(self.F) * self.r
        sc = np.array([256 / self.W, 256 / self.Hpx])
        d = np.linalg.norm((tracks - self.gt[:, idx]) * sc, axis=-1)[:, 1:]
        v = self.vis[:, idx][:, 1:] & self.vis[:, :1]
        return float(np.mean([((d < t) & v).sum() / max(v.sum(), 1) for t in THRESHOLDS_256]))

    def measure(self) -> dict:
        c = self.costs("dim")
        fixed = self.tracks(c)
        out = dict(qk_acc=self.published_acc(fixed), **self.scores())
        out["B4_qk_acc"] = self.published_acc(self.tracks(c, "B4"))
        sm = self.tracks(c, "extra_softmax")
        out["extra_softmax_qk_acc"] = self.published_acc(sm)
        i0 = c.argmax(-1)
        i1 = torch.softmax(c.float(), -1).argmax(-1)
        out["extra_softmax_changed_argmax"] = int((i0 != i1).sum())
        out["argmax_total"] = int(i0.numel())
        b3 = self.scores("B3")
        out.update({f"B3_{k}": v for k, v in b3.items()})
        out["delta_avg"] = self.delta_avg(fixed)
        out["B2_delta_avg"] = self.delta_avg(self.tracks(self.costs("heads")))
        out["difftrack_frames_qk_acc"] = self.difftrack_acc(fixed)  # same tracks, the project's frames
        out["softargmax_qk_acc"] = self.published_acc(self.soft_tracks(c))  # the project's refinement
        return out


# ---------------------------------------------------------------------------------------------- synthetic
def synthetic_layer(seed: int, heads=30, dim=64, F=13, rows=30, cols=45, text=226, s=16, T=49, grid=20) -> Layer:
    """Query/key in the published layout from random Fourier features of the world position under a known motion:
    zoom about the centre, drift and a sinusoidal sway (non-linear in time, so the 13 -> 49 interpolation matters);
    tokens of latent frame f show video frame 4 f."""
    rng = np.random.default_rng(seed)
    W, Hp = cols * s, rows * s
    c = np.array([W / 2, Hp / 2])
    zoom, drift = rng.uniform(-0.12, 0.12), rng.uniform(-1.2, 1.2, 2)
    amp, per = rng.uniform(4, 12, 2), rng.uniform(14, 30)

    def shift(t):
        return drift * t + amp * np.sin(2 * np.pi * t / per)

    def z(t):
        return 1 + zoom * t / (T - 1)

    def warp(p0, t):
        return c + z(t) * (p0 - c) + shift(t)

    def unwarp(p, t):
        return c + (p - shift(t) - c) / z(t)

    ell, a2 = 10.0, 90.0
    omega = rng.normal(0, 1 / ell, (heads, dim, 2))
    phase = rng.uniform(0, 2 * np.pi, (heads, dim))

    def phi(p):  # p [m, 2] -> [heads, m, dim]
        return np.sqrt(2 * a2 / dim) * np.cos(np.einsum("mc,hdc->hmd", p, omega) + phase[:, None])

    yy, xx = np.meshgrid((np.arange(rows) + 0.5) * s, (np.arange(cols) + 0.5) * s, indexing="ij")
    centres = np.stack([xx.ravel(), yy.ravel()], -1)
    qs, ks = [rng.normal(0, 1.0, (heads, text, dim))], [rng.normal(0, 1.0, (heads, text, dim))]
    for f in range(F):
        w = phi(unwarp(centres, 4 * f))
        qs.append(w + rng.normal(0, 0.6, w.shape))
        ks.append(w + rng.normal(0, 0.6, w.shape))
    q = torch.from_numpy(np.concatenate(qs, 1)).float()
    k = torch.from_numpy(np.concatenate(ks, 1)).float()
    m = W / 64  # CoTracker's grid: margin W/64 on both axes
    gx, gy = np.meshgrid(np.linspace(m, W - m, grid), np.linspace(m, Hp - m, grid))
    queries = np.stack([gx.ravel(), gy.ravel()], -1).astype(np.float32)
    gt = np.stack([warp(queries.astype(np.float64), t) for t in range(T)], 1)  # [n, T, 2]
    vis = (gt[..., 0] >= 0) & (gt[..., 0] < W) & (gt[..., 1] >= 0) & (gt[..., 1] < Hp)
    for n in range(len(queries)):  # occlusion intervals
        if rng.random() < 0.3:
            a = rng.integers(0, T)
            vis[n, a:a + rng.integers(3, 15)] = False
    return Layer(q, k, F, rows, cols, text, s, W, Hp, queries, gt, vis, temporal=4)


# ---------------------------------------------------------------------------------------------- embedded model
def embedded_layers(runner, n_videos: int, grid: int, num_steps: int = 50, step: int = 49):
    """Per layer, the measurements on ``n_videos`` exact-GT world videos noised to ``step`` (``[video][layer]``)."""
    from difftrack.capture import capture
    from difftrack.world import World

    T, H, W = runner.resolve_size(None)
    w = World(T, H, W)
    q3 = w.grid_queries(grid)
    out = []
    fams = ("objects", "scenes")
    for i in range(n_videos):
        s = w.sample(i // 2, fams[i % 2], "heldout")
        gt, vis = w.tracks(s, q3)
        rows = {}

        def on_qk(ev):
            g = ev.grid
            lay = Layer(ev.q[0].float(), ev.k[0].float(), g.frames, g.rows, g.cols, ev.q.shape[2] - g.num_video,
                        runner.stride, W, H, q3[:, 1:].astype(np.float32), gt, vis, runner.temporal)
            rows[ev.layer] = lay.measure()

        with capture(runner.pipe, layers="all", store=False, on_qk=on_qk) as cap:
            runner.noised_forwards(s.video, s.prompt, num_steps, [step], 0, cap)
        out.append([rows[l] for l in sorted(rows)])
    return out


def chunk_plan_effect(runner, n_videos: int, grid: int, frames: int = 30) -> dict:
    """delta_avg of DiffTracker (argmax + interpolation) with the project's and the published chunk plan on
    ``frames``-frame world videos, and with sqrt(num_heads) [B2] on the model's own length."""
    from difftrack.tracking import DiffTracker, plan_chunks
    from difftrack.world import World

    T0, H, W = runner.resolve_size(None)
    res = {"difftrack": [], "published": [], "tau_dim": [], "tau_heads": []}
    for i in range(n_videos):
        fam = ("objects", "scenes")[i % 2]
        for T, keys in ((frames, ("difftrack", "published")), (T0, ("tau_dim", "tau_heads"))):
            w = World(T, H, W)
            s = w.sample(i // 2, fam, "heldout")
            q = w.grid_queries(grid)
            gt, vis = w.tracks(s, q)
            for key in keys:
                tr = DiffTracker(runner.pipe, refine="paper", occlusion="none",
                                 chunk_plan="published" if key == "published" else "difftrack",
                                 tau="heads" if key == "tau_heads" else None)
                pred, _ = tr(s.video, q, prompt=s.prompt)
                d = np.linalg.norm((pred - gt) * (256 / W), axis=-1)[:, 1:]
                v = vis[:, 1:] & vis[:, :1]
                res[key].append(float(np.mean([((d < t) & v).sum() / max(v.sum(), 1) for t in THRESHOLDS_256])))
    plans = {f"T={T}": dict(difftrack=len(plan_chunks(T, 0)), published=len(plan_chunks(T, 0, plan="published")),
                            same=plan_chunks(T, 0) == plan_chunks(T, 0, plan="published"))
             for T in (13, 25, 30, 49, 50, 250)}
    return dict(videos=n_videos, frames=frames, chunks=plans,
                delta_avg={k: float(np.mean(v)) for k, v in res.items()}, per_video=res)


# ---------------------------------------------------------------------------------------------- report
def effects(rows: list[dict]) -> dict:
    """Mean over inputs of every measurement, and each defect's effect in points (defect minus fixed)."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    pts = lambda a, b: 100 * (mean[a] - mean[b])  # noqa: E731
    return dict(mean=mean, effect_points={
        "B4 (qk_acc)": pts("B4_qk_acc", "qk_acc"),
        "extra softmax (qk_acc)": pts("extra_softmax_qk_acc", "qk_acc"),
        "B3 (conf_cross)": pts("B3_conf_cross", "conf_cross"),
        "B3 (attn_cross)": pts("B3_attn_cross", "attn_cross"),
        "B3 (conf_self)": pts("B3_conf_self", "conf_self"),
        "B2 (tracking delta_avg)": pts("B2_delta_avg", "delta_avg"),
        "project frames instead of published (qk_acc)": pts("difftrack_frames_qk_acc", "qk_acc"),
        "soft-argmax instead of argmax + interpolation (qk_acc)": pts("softargmax_qk_acc", "qk_acc"),
    }, extra_softmax_changed_argmax=int(sum(r["extra_softmax_changed_argmax"] for r in rows)),
        argmax_total=int(sum(r["argmax_total"] for r in rows)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=int, default=3, help="synthetic videos in the published layout")
    ap.add_argument("--videos", type=int, default=4, help="embedded-model world videos (exact GT)")
    ap.add_argument("--grid", type=int, default=10, help="query grid side on the embedded model")
    ap.add_argument("--out", default=str(ROOT / "results" / "protocol_effects.json"))
    a = ap.parse_args(argv)
    if a.synthetic < 1 or a.videos < 1 or a.grid < 1:
        raise SystemExit("--synthetic, --videos and --grid must be >= 1")
    torch.manual_seed(0)
    t0 = time.time()
    syn = [synthetic_layer(seed).measure() for seed in range(a.synthetic)]
    out = dict(device=device_name("cpu"), commit=git_commit(short=True), torch=torch.__version__,
               settings=dict(synthetic_videos=a.synthetic, embedded_videos=a.videos, embedded_grid=a.grid,
                             embedded_step="49 of 50 (t = 19), world videos noised, one forward, every layer",
                             synthetic_layout="13 latent frames of 30x45 tokens, 226 text tokens, 30 heads x 64, "
                                              "480x720, 49 video frames, 20x20 CoTracker grid"),
               synthetic=effects(syn))
    print("synthetic", json.dumps(out["synthetic"]["effect_points"], indent=1), f"{time.time() - t0:.0f} s")
    from difftrack.runners import VideoRunner, load_pipeline

    runner = VideoRunner(load_pipeline("embedded", "cpu", "float32"))
    per_video = embedded_layers(runner, a.videos, a.grid)
    L = len(per_video[0])
    by_layer = [effects([v[l] for v in per_video]) for l in range(L)]
    best = int(np.argmax([b["mean"]["qk_acc"] for b in by_layer]))
    out["embedded"] = dict(best_layer=best, best_layer_effects=by_layer[best],
                           all_layers=effects([r for v in per_video for r in v]),
                           max_abs_effect_over_layers={k: float(max(abs(b["effect_points"][k]) for b in by_layer))
                                                       for k in by_layer[0]["effect_points"]},
                           note="latent frames are video frames on the embedded model: the temporal interpolation "
                                "is the identity, only frame 0 and the visibility rule separate the frames scored")
    out["chunk_plan"] = chunk_plan_effect(runner, a.videos, a.grid)
    out["seconds"] = time.time() - t0
    write_json(Path(a.out), json_clean(out), indent=1)
    print("embedded best layer", best, json.dumps(by_layer[best]["effect_points"], indent=1))
    print("chunk plan", json.dumps(out["chunk_plan"]["delta_avg"]), f"wrote {a.out} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
