"""difftrack: temporal correspondences inside video diffusion transformers (DiffTrack, Nam et al. 2025).

Submodules are imported lazily so that ``import difftrack`` stays cheap (``tests/test_package.py`` checks that this
list and ``_SUBMODULES`` name exactly the modules on disk):

* ``difftrack.capture``       -- query/key/feature capture from diffusers video transformers
* ``difftrack.hooks``         -- the interception layer of capture and CAG (SDPA calls, processor wrappers, grids,
                                 refusal of diffusers hooks that skip work, the completeness check)
* ``difftrack.backbones``     -- per-backbone adapters (token layout, attention modules, CFG branches)
* ``difftrack.runners``       -- loading local pipelines and running them with each backbone's conventions
* ``difftrack.matching``      -- memory-bounded frame-to-frame matching
* ``difftrack.fused``         -- the matching's fused GPU kernel (Triton; a torch reference elsewhere)
* ``difftrack.analysis``      -- the paper's layer/timestep analysis: recording, ground truth, per-(step, layer) tables
* ``difftrack.inspect_attn``  -- attention maps and q/k PCA of one run for the notebooks
* ``difftrack.tracking``      -- zero-shot point tracking (DiffTracker, FeatureTracker)
* ``difftrack.tapvid``        -- TAP-Vid loader and metrics (pure numpy)
* ``difftrack.baselines``     -- classical trackers (Lucas-Kanade, dense flow, patch matching)
* ``difftrack.guidance``      -- Cross-Attention Guidance (CAG)
* ``difftrack.guiders``       -- CAG as a diffusers guider (``BaseGuidance``) for modular pipelines
* ``difftrack.selection``     -- layers, heads and step chosen by measurement (tracker, CAG, diffusers guiders)
* ``difftrack.cag_eval``      -- CAG evaluation measures and generation of the evaluated videos
* ``difftrack.world``         -- the procedural video world with exact tracks
* ``difftrack.mini``          -- the embedded mini video DiT (CogVideoX class) and its pipeline
* ``difftrack.testing``       -- tiny random pipelines of the real diffusers classes (tests, benchmarks)
* ``difftrack.viz``           -- plotting only; ``difftrack.viz_tracks`` -- track drawing
* ``difftrack.sliders``       -- ipywidgets slider panels drawn in the kernel (headless-safe)
* ``difftrack.click_track``   -- click points on any frame and track them (notebook 04; a widget drawn in the kernel)
* ``difftrack.params``        -- the notebooks' parameter checks (before any model load or file write)
* ``difftrack.experiments``   -- the experiments layer: the three jobs' items, per-item caches and resume, the one
  cache key, typed result records (JSON), the committed paper-scale results read back, several processes
  (``torchrun`` / ``accelerate launch``); scripts and notebooks call it
* ``difftrack.checks``        -- input checks shared by the public entry points (videos, queries, sizes)
* ``difftrack.video_io``, ``difftrack.fileio``, ``difftrack.paths``, ``difftrack.provenance`` -- video files, damaged-file
  errors, the project's folders, commit and device of a measurement
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = ("capture", "hooks", "backbones", "runners", "matching", "fused", "analysis", "inspect_attn", "tracking", "tapvid",
               "baselines", "guidance", "guiders", "selection", "cag_eval", "world", "mini", "testing", "viz", "viz_tracks", "sliders",
               "click_track", "params", "experiments", "checks", "video_io", "fileio", "paths", "provenance")


_EXPORTS = {"WorldTextEncoder": "mini", "MiniVideoPipeline": "mini", "capture": "capture"}


def __getattr__(name):
    if name in _EXPORTS and name != _EXPORTS[name]:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'difftrack' has no attribute {name!r}")
