"""Full-scale layer/timestep analysis summary (issue 5): the numbers behind notebooks 02 and 03 at paper scale.

    # everything on one machine (OpenCV needed for the pseudo ground truth of generated videos)
    python scripts/run_analysis.py --videos-per-family 20 --exact 20 --steps 50 --grid 10 --device cuda
    # the same with 8 processes sharing the GPU (or spread over the GPUs, machines: see the README)
    torchrun --nproc_per_node 8 scripts/run_analysis.py --videos-per-family 20 --exact 20 --steps 50 --grid 10

    # split: record on a GPU box without OpenCV, score on a CPU box later (same --cache folder, copied over, and
    # the same --videos-per-family/--exact/--steps/--grid/--seed)
    python scripts/run_analysis.py --phase record --device cuda --cache cache/analysis
    python scripts/run_analysis.py --phase score --cache cache/analysis --out results/analysis_summary.json

    # CPU check with tiny settings
    python scripts/run_analysis.py --videos-per-family 1 --exact 1 --steps 3 --grid 4 --cache /tmp/ra --out /tmp/ra.json

``record`` runs the model: every video of :func:`difftrack.experiments.analysis.analysis_items` goes through
:func:`difftrack.experiments.analysis.record_dataset` (one cached ``.npz`` record + video per file, resumable; under a
launcher each process records its share of the videos, :mod:`difftrack.experiments.distributed`), and one extra
video is timed against plain generation in separate subprocesses (``analysis_time_ratio``,
``analysis_extra_peak_mib``; rank 0, after every process has recorded). It imports only torch, numpy, diffusers and
difftrack. ``score`` needs no model: it adds ground truth (exact world tracks; Lucas-Kanade pseudo GT, OpenCV)
through ``run_dataset``'s cache and writes the summary (one process; under a launcher rank 0 scores after the
record). ``all`` does both.

The summary (``--out``) holds, for the generated (pseudo GT), exact (world, exact GT) and combined sets:
``qk_best_acc`` and ``feat_best_acc`` (best layer at the last step), ``best_layers_top3`` (harmonic mean at the last
step), ``hm_top3_over_median``, ``acc_last_over_first_step`` (best layer); plus counts, settings, device, seconds and
commit. These top-level numbers are the project's scoring protocol (``"protocol": "difftrack"``); the same blocks and
tables under the published protocol (:mod:`difftrack.analysis`: argmax + match-map interpolation, every video frame
scored with frame 0, scores at sqrt(head_dim)) are under ``"published"``. Both come from one recording
(``--protocols``, both by default); records cached without the published protocol are recorded again.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from difftrack import analysis  # noqa: E402
from difftrack.experiments import analysis as xa  # noqa: E402
from difftrack.experiments import json_clean, write_json, write_record  # noqa: E402
from difftrack.experiments.distributed import processes  # noqa: E402
from difftrack.runners import load_pipeline, model_tag  # noqa: E402
from difftrack.provenance import device_name, git_commit  # noqa: E402

RECORD_META = "record_meta.json"
#: What a launcher puts in a process's environment (removed for the timing subprocesses).
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos-per-family", type=int, default=20, help="generated videos per family (pseudo GT)")
    ap.add_argument("--exact", type=int, default=20, help="world videos per family with exact GT")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps")
    ap.add_argument("--grid", type=int, default=10, help="query grid side in frame 0")
    ap.add_argument("--seed", type=int, default=0, help="first world-video / noise seed")
    ap.add_argument("--model", default="embedded", help="'embedded' or a local MiniVideoPipeline folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--phase", default="all", choices=("record", "score", "all"))
    ap.add_argument("--out", default="results/analysis_summary.json", help="summary JSON (score/all)")
    ap.add_argument("--cache", default="cache/analysis", help="per-video records (shared by record and score)")
    ap.add_argument("--timing-steps", type=int, default=None, help="steps of the timed video (default: --steps)")
    ap.add_argument("--no-timing", action="store_true", help="skip the analysis-vs-generation timing")
    ap.add_argument("--timing-only", action="store_true",
                    help="only time one video (plain generation vs analysis of all layers and steps, separate "
                         "processes) and merge the result into --out")
    ap.add_argument("--protocols", default="difftrack,published",
                    help="scoring protocols recorded and summarised (difftrack = the project's, the top-level "
                         "numbers; published = the published code's definitions, defects fixed, under 'published'); "
                         "one run records both")
    ap.add_argument("--measure", choices=("plain", "analysis"), help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args(argv)
    for name in ("videos_per_family", "exact"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    if args.videos_per_family + args.exact == 0:
        raise SystemExit("nothing to analyse: --videos-per-family and --exact are both 0")
    if args.steps < 1 or args.grid < 1:
        raise SystemExit("--steps and --grid must be >= 1")
    try:
        args.protocols = analysis.check_protocols([p.strip() for p in args.protocols.split(",") if p.strip()])
    except ValueError as e:
        raise SystemExit(f"--protocols {args.protocols!r}: {e}") from None
    return args


def _resolve(p: str) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


def commit() -> str:
    """Short hash of the code that runs (:func:`difftrack.provenance.git_commit`)."""
    return git_commit(short=True)


# ---------------------------------------------------------------------------------------------- timing
def measure(args) -> dict:
    """Subprocess body: one plain generation or one recorded analysis of the first generated item's prompt."""
    dev = args.device
    from difftrack.runners import VideoRunner

    runner = VideoRunner(load_pipeline(args.model, dev, args.dtype))
    steps = args.timing_steps or args.steps
    prompt = xa.analysis_items(1, 0, args.seed)[0]["prompt"]
    cuda = dev.startswith("cuda")

    def once(n):
        if args.measure == "plain":
            runner.generate(prompt, args.seed, n)
        else:
            analysis.analyze_generation(runner, prompt, args.seed, num_steps=n, grid_size=args.grid,
                                        protocols=args.protocols)
        if cuda:
            torch.cuda.synchronize()

    once(1)  # warm-up (kernels, allocator), the same for both modes
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    once(steps)
    sec = time.perf_counter() - t0
    out = dict(mode=args.measure, steps=steps, seconds=sec,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    if cuda:
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def timing(args) -> dict:
    """Plain generation vs recorded analysis of one video, each in a fresh subprocess (fair peak memory)."""
    res = {}
    for mode in ("plain", "analysis"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", mode, "--device", args.device,
               "--dtype", args.dtype, "--model", args.model, "--steps", str(args.steps), "--grid", str(args.grid),
               "--seed", str(args.seed), "--protocols", ",".join(args.protocols)]
        if args.timing_steps:
            cmd += ["--timing-steps", str(args.timing_steps)]
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}  # a plain single process
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if p.returncode:
            raise RuntimeError(f"timing subprocess ({mode}) failed:\n{p.stderr[-3000:]}")
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    out = dict(timing_steps=res["plain"]["steps"], plain_seconds=res["plain"]["seconds"],
               analysis_seconds=res["analysis"]["seconds"],
               analysis_time_ratio=res["analysis"]["seconds"] / res["plain"]["seconds"],
               plain_peak_rss_mib=res["plain"]["peak_rss_mib"], analysis_peak_rss_mib=res["analysis"]["peak_rss_mib"],
               analysis_extra_peak_mib=res["analysis"]["peak_rss_mib"] - res["plain"]["peak_rss_mib"],
               memory_note="peak resident set size (ru_maxrss) of separate processes; CPU memory only")
    if "peak_cuda_mib" in res["plain"]:
        out.update(plain_peak_cuda_mib=res["plain"]["peak_cuda_mib"],
                   analysis_peak_cuda_mib=res["analysis"]["peak_cuda_mib"],
                   analysis_extra_peak_cuda_mib=res["analysis"]["peak_cuda_mib"] - res["plain"]["peak_cuda_mib"])
    return out


# ---------------------------------------------------------------------------------------------- phases
def record(args, items, cache: Path, procs) -> dict | None:
    """Record this process's share of the videos; then, on rank 0 only, the run's meta (and timing). Other ranks
    return ``None``."""
    t0 = time.time()
    pipe = load_pipeline(args.model, procs.device(args.device), args.dtype)
    xa.record_dataset(pipe, items, cache, num_steps=args.steps, grid_size=args.grid, processes=procs,
                      protocols=args.protocols)
    del pipe
    if not procs.is_main:
        return None
    meta = dict(device=args.device, device_name=device_name(procs.device(args.device)), dtype=args.dtype,
                model=args.model, record_wall_seconds=time.time() - t0, record_processes=procs.world_size,
                commit=commit(), torch=torch.__version__)
    if not args.no_timing:
        meta["timing"] = timing(args)
    path = cache / RECORD_META
    old = json.loads(path.read_text()) if path.exists() else {}
    old[f"s{args.steps}_g{args.grid}"] = meta
    write_json(path, json_clean(old), indent=2)
    return meta


def ranking(tables: dict) -> dict:
    """Layers ranked by harmonic mean at the last step (best first) and the three least dominant."""
    from difftrack.analysis import top_layers

    order = top_layers(tables["hm"], k=tables["hm"].shape[1], step=-1)
    return dict(layer_ranking=order, worst_layers_bottom3=order[-3:])


def pseudo_vs_exact_summary(items, cache: Path, args) -> dict | None:
    """Pseudo ground truth (Lucas-Kanade) against exact tracks on the exact-GT world videos: TAP-Vid metrics per
    family and over all (mean over videos), at 1, 2, 4, 8 px (half a token is 2 px on the embedded model)."""
    from difftrack.world import World

    rows = {}
    for it in items:
        if it["kind"] != "exact":
            continue
        rec, video = xa.load_cached(cache, it, args.steps, args.grid)
        w = World(*video.shape[:3])
        q = np.concatenate([np.zeros((len(rec.queries), 1), np.float32), rec.queries], 1)
        tr, vis = w.tracks(w.sample(it["seed"], it["family"], it.get("split", "heldout")), q)
        rows.setdefault(it["family"], []).append(analysis.pseudo_vs_exact(video, rec.queries, tr, vis))
    if not rows:
        return None
    rows["all"] = [r for fam in list(rows) for r in rows[fam]]
    return dict({fam: dict(n_videos=len(rs), **{k: float(np.nanmean([r[k] for r in rs])) for k in rs[0]})
                 for fam, rs in rows.items()},
                note="pseudo GT (OpenCV LK, forward-backward check) vs exact world tracks on the exact-GT videos, "
                     "TAP-Vid query mode 'first', thresholds in px at 64x64; mean over videos")


def score(args, items, cache: Path, record_meta: dict | None) -> dict:
    missing = [it for it in items if not (cache / f"{xa.record_stem(it, args.steps, args.grid)}.npz").exists()]
    if missing and args.phase == "score":
        raise SystemExit(f"{len(missing)} of {len(items)} videos have no record in {cache} (first: {missing[0]}); "
                         f"run --phase record with the same --videos-per-family/--exact/--steps/--grid/--seed first")
    t0 = time.time()
    results = xa.run_dataset(None, items, cache, num_steps=args.steps, grid_size=args.grid, protocols=args.protocols)
    score_sec = time.time() - t0
    grouped = xa.group_tables(results)
    names = {"generated": "generated", "exact": "exact", "all": "combined"}
    rec_sec = {k: [] for k in ("generated", "exact")}
    for it in items:
        rec, _ = xa.load_cached(cache, it, args.steps, args.grid)
        rec_sec[it["kind"]].append(float(rec.meta.get("seconds", float("nan"))))
    if record_meta is None:
        meta_path = cache / RECORD_META
        record_meta = json.loads(meta_path.read_text()).get(f"s{args.steps}_g{args.grid}") if meta_path.exists() \
            else None
    rec0, _ = xa.load_cached(cache, items[0], args.steps, args.grid)

    def blocks(protocol):
        tabs = {k: xa.protocol_tables(g, protocol) for k, g in grouped.items()}
        return {names[k]: dict(count=sum(1 for it in items if k == "all" or it["kind"] == k),
                               **xa.summarize_tables(g).to_dict(), **ranking(g)) for k, g in tabs.items()}, \
            {names[k]: {n: np.round(v, 5).tolist() for n, v in g.items()} for k, g in tabs.items()}

    main_blocks, main_tables = blocks("difftrack")
    out = dict(
        num_steps=args.steps, generated_per_family=args.videos_per_family, exact_per_family=args.exact,
        protocol="difftrack", protocol_note=xa.PROTOCOL_NOTES["difftrack"],
        **main_blocks,
        timesteps=[int(t) for t in rec0.timesteps],
        tables=main_tables,
        tables_note="per subset, each table [steps][layers] (step 0 = noisiest), mean over videos, project protocol "
                    "(the published protocol's: published.tables): qk_acc / feat_acc "
                    "(fraction of visible points within half a token, frames 1..), conf_{text,self,cross} "
                    "(confidence score), attn_{text,self,cross} (attention score), hm (harmonic mean of min-max "
                    "normalised qk_acc, conf_cross, attn_cross)",
        attention_share={names[k]: {p: np.round(g[f"attn_{p}"].mean(1), 5).tolist() for p in analysis.SCORE_PARTS}
                         for k, g in grouped.items()},
        attention_share_note="Fig. 5: share of a frame-0 query's attention on text / its own frame / other frames, "
                             "per step (mean over layers and videos)",
        pseudo_vs_exact=pseudo_vs_exact_summary(items, cache, args),
        counts=dict(generated=sum(it["kind"] == "generated" for it in items),
                    exact=sum(it["kind"] == "exact" for it in items), total=len(items),
                    points_per_video=args.grid ** 2),
        settings=dict(videos_per_family=args.videos_per_family, exact_per_family=args.exact, steps=args.steps,
                      grid=args.grid, seed=args.seed, model=args.model, dtype=args.dtype, guidance_scale=6.0,
                      accuracy_threshold="half a token", families=sorted({it["family"] for it in items})),
        device=(record_meta or {}).get("device_name", device_name(args.device)),
        seconds=dict(record_per_video_generated=float(np.mean(rec_sec["generated"])) if rec_sec["generated"] else None,
                     record_per_video_exact=float(np.mean(rec_sec["exact"])) if rec_sec["exact"] else None,
                     record_total=float(np.nansum(rec_sec["generated"] + rec_sec["exact"])),
                     record_wall=(record_meta or {}).get("record_wall_seconds"),
                     record_processes=(record_meta or {}).get("record_processes",
                                                              (record_meta or {}).get("record_workers", 1)),
                     score=score_sec,
                     note="record_per_video_* and record_total: each video's own wall time (with record_processes "
                          "> 1 the processes share the devices, so these add up to more than record_wall)"),
        commit=commit(), record_commit=(record_meta or {}).get("commit"),
    )
    if "published" in args.protocols:
        pub_blocks, pub_tables = blocks("published")
        out["published"] = dict(protocol="published", protocol_note=xa.PROTOCOL_NOTES["published"], **pub_blocks,
                                tables=pub_tables)
    timing_res = (record_meta or {}).get("timing")
    if timing_res:
        out.update(analysis_time_ratio=timing_res["analysis_time_ratio"],
                   analysis_extra_peak_mib=timing_res["analysis_extra_peak_mib"], timing=timing_res)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    if args.timing_only or args.phase == "score":
        if processes().distributed:
            raise SystemExit(f"--phase {args.phase}{' --timing-only' if args.timing_only else ''} runs on one "
                             f"process; launch it without torchrun / accelerate launch")
    if args.timing_only:
        out = _resolve(args.out)
        prev = json.loads(out.read_text()) if out.exists() else {}
        t = timing(args)
        t.update(device=device_name(args.device), model=args.model, dtype=args.dtype, grid=args.grid,
                 torch=torch.__version__, commit=commit())
        prev.update(timing=t, analysis_time_ratio=t["analysis_time_ratio"],
                    analysis_extra_peak_mib=t["analysis_extra_peak_mib"])
        if "combined" not in prev:
            prev["status"] = ("timing only: the full-scale record (--phase all) has not been run yet; the "
                              "correspondence numbers are missing")
        write_json(out, json_clean(prev), indent=2)
        print(f"one video, {t['timing_steps']} steps on {t['device']}: analysis {t['analysis_seconds']:.1f} s vs "
              f"plain {t['plain_seconds']:.1f} s (x{t['analysis_time_ratio']:.2f}), extra peak RSS "
              f"{t['analysis_extra_peak_mib']:.0f} MiB; wrote {out}")
        return 0
    cache = _resolve(args.cache) / model_tag(args.model, args.dtype)
    cache.mkdir(parents=True, exist_ok=True)
    items = xa.analysis_items(args.videos_per_family, args.exact, args.seed)
    procs = processes()
    t0 = time.time()
    meta = None
    if args.phase in ("record", "all"):
        meta = record(args, items, cache, procs)
        if not procs.is_main:  # rank 0 merges (scores) and writes
            procs.finish()
            return 0
        print(f"recorded {len(items)} videos in {meta['record_wall_seconds']:.1f} s on {meta['device_name']}")
        if "timing" in meta:
            t = meta["timing"]
            print(f"one video, {t['timing_steps']} steps: analysis {t['analysis_seconds']:.1f} s vs plain "
                  f"{t['plain_seconds']:.1f} s (x{t['analysis_time_ratio']:.2f}), extra peak RSS "
                  f"{t['analysis_extra_peak_mib']:.0f} MiB")
    if args.phase in ("score", "all"):
        summary = score(args, items, cache, meta)
        summary["seconds"]["this_run_wall"] = time.time() - t0
        out = _resolve(args.out)
        prev = json.loads(out.read_text()) if out.exists() else {}
        if "timing" not in summary and prev.get("timing"):  # keep an earlier --timing-only measurement
            summary.update({k: prev[k] for k in ("timing", "analysis_time_ratio", "analysis_extra_peak_mib")
                            if k in prev})
        write_record(out, xa.AnalysisSummary.from_json(summary), indent=2)
        for proto, blk in (("difftrack", summary), ("published", summary.get("published") or {})):
            for k in ("generated", "exact", "combined"):
                if k in blk:
                    s = blk[k]
                    print(f"{proto:9s} {k:9s} n={s['count']:3d}: qk best {100 * s['qk_best_acc']:.1f} %, feat best "
                          f"{100 * s['feat_best_acc']:.1f} %, top-3 {s['best_layers_top3']}, HM top3/median "
                          f"{s['hm_top3_over_median']:.2f}, acc last/first {s['acc_last_over_first_step']:.2f}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
