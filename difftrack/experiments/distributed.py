"""Several processes for every experiment job: the item split, the barrier, the merge on rank 0 and the device of
each process, in one place.

A job script runs unchanged as one process (no launcher: rank 0 of 1, nothing distributed is initialised) or under
a launcher that starts N copies of it, on one machine or several::

    torchrun --nproc_per_node 4 scripts/run_analysis.py ...
    accelerate launch --multi_gpu --num_processes 4 scripts/run_analysis.py ...   # --multi_gpu also on a CPU box

Under a launcher (``WORLD_SIZE`` > 1 in the environment) :func:`processes` initialises the process group through
accelerate's ``PartialState(cpu=True)``: a gloo group used only for barriers and for gathering small Python objects,
so that several processes may share one GPU (an NCCL group needs one GPU per process). Each process then picks its
own device (:meth:`Processes.device`: ``cuda`` -> ``cuda:<local rank mod GPU count>``).

The rules every job follows, so that results do not depend on the number of processes:

* items are split **by item index** (:meth:`Processes.indices`: rank ``r`` of ``n`` takes items ``r, r + n, ...``;
  strided rather than accelerate's contiguous ``split_between_processes`` blocks because the job lists put the
  expensive items, generated videos, first); a unit whose result depends on what is computed with it (a batch of
  videos generated together) is itself a unit of the split, fixed by item index, never by rank;
* each rank writes one cache entry per item, atomically; nothing else is written by a non-main rank;
* after :meth:`Processes.barrier` rank 0 reads every entry back in item order and writes the results;
* progress bars are drawn on rank 0 only (:meth:`Processes.progress`).

An interrupted run (any rank killed; torchrun then stops the others) is resumed by running the same command again:
finished items are read from their cache entries. ``DIFFTRACK_STOP_AFTER_ITEMS=k`` in the environment makes every
rank exit (code :data:`STOPPED_EXIT_CODE`) after it has finished ``k`` items: how the tests kill a run midway.

The device of a process on CPU-only runs is ``cpu``; CPU threads per process are the launcher's (torchrun and
accelerate set ``OMP_NUM_THREADS=1``). torch's CPU kernels may sum in another order with another thread count, so
byte-identical CPU results are only promised for the same threads per process (on the 2-core test machine 1 and 2
threads gave the same analysis records and plain generations, but CAG videos one grey level apart); on a GPU each
process runs the kernels one process would run for the same item.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

__all__ = ["Processes", "processes", "STOP_ENV", "STOPPED_EXIT_CODE"]

#: Environment variable: every rank exits after finishing this many items (tests of the resume).
STOP_ENV = "DIFFTRACK_STOP_AFTER_ITEMS"
#: Exit code of a rank stopped by :data:`STOP_ENV`.
STOPPED_EXIT_CODE = 75
#: How long a barrier waits for the slowest rank (one item of a large model can take many minutes).
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the job's processes.

    Attributes:
        rank: global index of this process, ``0 <= rank < world_size``.
        world_size: number of processes of the job (every machine).
        local_rank: index of this process on its machine (picks its GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if not (isinstance(self.world_size, int) and self.world_size >= 1 and 0 <= self.rank < self.world_size
                and self.local_rank >= 0):
            raise ValueError(f"rank={self.rank!r}, world_size={self.world_size!r}, local_rank={self.local_rank!r}; "
                             f"allowed: world_size >= 1, 0 <= rank < world_size, local_rank >= 0")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that merges and writes the results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------ split
    def indices(self, n: int) -> list[int]:
        """This rank's share of ``n`` items: ``[rank, rank + world_size, ...]`` (a function of the item index
        only)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n={n!r}; allowed: an integer >= 0 (the number of items)")
        return list(range(self.rank, n, self.world_size))

    def mine(self, items: Sequence) -> list:
        """This rank's items, in item order (:meth:`indices`)."""
        return [items[i] for i in self.indices(len(items))]

    # ------------------------------------------------------------------------------------------ device
    def device(self, device: str) -> str:
        """The device of this process for the job's ``device``: ``"cuda"`` (no index) -> ``"cuda:<local_rank mod
        the visible GPU count>"`` (several processes share a GPU when there are more processes than GPUs); any other
        device (``"cpu"``, ``"cuda:1"``) is used as given."""
        device = str(device)
        if device != "cuda" or not self.distributed:
            return device
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"device 'cuda' asked for by rank {self.rank}, but no CUDA device is visible; "
                             f"allowed here: 'cpu'")
        return f"cuda:{self.local_rank % n}"

    # ------------------------------------------------------------------------------------------ sync
    def barrier(self) -> None:
        """Wait until every process gets here (nothing with one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` with one process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def progress(self, iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True):
        """``iterable`` with a tqdm bar on rank 0 (other ranks: the plain iterable)."""
        if not (enabled and self.is_main):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc if not self.distributed else f"{desc} (rank 0 of {self.world_size})",
                    total=total)

    # ------------------------------------------------------------------------------------------ jobs
    def run(self, items: Sequence, work: Callable[[int, Any], Any], desc: str, progress: bool = True) -> None:
        """Call ``work(index, item)`` for this rank's items (:meth:`indices`), each of which writes its own cache
        entry, then wait for every rank (:meth:`barrier`). Honours :data:`STOP_ENV`."""
        stop = _stop_after()
        done = 0
        for i in self.progress(self.indices(len(items)), desc, enabled=progress):
            work(i, items[i])
            done += 1
            if stop is not None and done >= stop:
                print(f"[rank {self.rank}] {STOP_ENV}={stop}: stopping after {done} items", file=sys.stderr,
                      flush=True)
                os._exit(STOPPED_EXIT_CODE)
        self.barrier()

    def map(self, fn: Callable[[Any], Any], tasks: Sequence, desc: str, progress: bool = True) -> list:
        """``[fn(t) for t in tasks]`` with the tasks split over the ranks (:meth:`indices`) and the results gathered
        back in task order on every rank (small picklable results: scores, not videos)."""
        mine = [(i, fn(tasks[i])) for i in self.progress(self.indices(len(tasks)), desc, enabled=progress)]
        out: list = [None] * len(tasks)
        for part in self.gather(mine):
            for i, r in part:
                out[i] = r
        return out

    def finish(self) -> None:
        """Leave the process group (end of a job; nothing with one process)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _stop_after() -> int | None:
    raw = os.environ.get(STOP_ENV)
    if raw in (None, ""):
        return None
    try:
        k = int(raw)
        if k < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{STOP_ENV}={raw!r}; allowed: an integer >= 1 (items per rank before it exits)") from None
    return k


def _launched_world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} in the environment; allowed: an integer >= 1 (set by the launcher)") \
            from None


def processes() -> Processes:
    """This process among the job's processes: one process (rank 0 of 1) without a launcher; under ``torchrun`` /
    ``accelerate launch`` (``WORLD_SIZE`` > 1) the gloo process group is initialised once through
    ``accelerate.PartialState(cpu=True, backend="gloo")`` and its rank, size and local rank are returned."""
    if _launched_world_size() <= 1:
        return Processes()
    try:
        from accelerate import PartialState
    except ImportError as err:
        raise ImportError(f"this job runs under a launcher (WORLD_SIZE={_launched_world_size()}), which needs the "
                          f"accelerate package (pip install 'accelerate>=0.30'); or run it as one plain process") \
            from err
    state = PartialState(cpu=True, backend="gloo", timeout=BARRIER_TIMEOUT)  # gloo, not MPI where torch has it
    if state.num_processes != _launched_world_size():
        raise RuntimeError(f"the launcher set WORLD_SIZE={_launched_world_size()} but accelerate initialised "
                           f"{state.num_processes} processes ({state.distributed_type})")
    if state.process_index != 0:  # progress bars on rank 0 only: also diffusers' loading bars
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    return Processes(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index)
