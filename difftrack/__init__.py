"""difftrack: temporal correspondences inside video diffusion transformers (DiffTrack, Nam et al. 2025).

Submodules are imported lazily so that ``import difftrack`` stays cheap:

* ``difftrack.capture``   -- query/key/feature capture from diffusers video transformers
* ``difftrack.backbones`` -- per-backbone adapters (token layout, attention modules, CFG branches)
* ``difftrack.world``     -- the procedural video world with exact tracks
* ``difftrack.mini``      -- the embedded mini video DiT (CogVideoX class) and its pipeline
* ``difftrack.matching``  -- memory-bounded frame-to-frame matching
* ``difftrack.metrics``   -- the paper's analysis metrics
* ``difftrack.tracking``  -- zero-shot point tracking
* ``difftrack.tapvid``    -- TAP-Vid loader and metrics (pure numpy)
* ``difftrack.guidance``  -- Cross-Attention Guidance (CAG)
* ``difftrack.viz``       -- plotting only
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = ("capture", "backbones", "world", "mini", "matching", "metrics", "tracking", "tapvid", "guidance",
               "viz", "baselines", "analysis", "video_io", "paths", "runner")


_EXPORTS = {"WorldTextEncoder": "mini", "MiniVideoPipeline": "mini", "capture": "capture"}


def __getattr__(name):
    if name in _EXPORTS and name != _EXPORTS[name]:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'difftrack' has no attribute {name!r}")
