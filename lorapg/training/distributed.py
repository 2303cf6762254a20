"""Data-parallel training: which process this is, how a global batch is shared, per-sample noise seeds.

``accelerate launch --num_processes N -m lorapg train CONFIG`` (``--multi_gpu`` on a machine without
CUDA, where the processes train on the CPU over gloo) starts N copies of the same run. ``batch_size``
is per process (kohya's and A1111's convention), so a step trains one *global* batch of
``batch_size × N`` images from one aspect bucket; process ``r`` takes slots ``[r·b, (r+1)·b)`` of it.

Everything the result depends on is a function of the global batch, never of the process: the
batches (``epoch_batches`` with the global size), each sample's noise and timestep (seeded from the
run's seed, the epoch, the batch and the sample's slot) and the loss scale (the sum over the
process's samples ÷ the global batch's size × N, so that DDP's average of the processes' gradients
is the gradient of the mean over the global batch). 2 processes × batch 2 thus train the LoRA that
1 process × batch 4 trains, up to float rounding.

The rank helpers read the launchers' environment (torchrun's ``RANK``, MPI's), so code that runs
before the accelerator exists (the CLI, the service) can tell the main process from the others.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from lorapg.errors import UserError

log = logging.getLogger(__name__)

# The variables accelerate itself reads (accelerate.state.PartialState): torchrun's, then MPI's.
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def world_size() -> int:
    return max(1, _first_int(_SIZE_VARS, 1))


def rank() -> int:
    return _first_int(_RANK_VARS, 0)


def is_main_process() -> bool:
    return rank() == 0


def end_process_group(accelerator, release_models: Callable[[], None], *, succeeded: bool = True) -> None:
    """End a run's process group in the one order that cannot hang at exit.

    gloo's worker threads free a finished collective's tensors just after its waiter returns, and
    freeing a tensor Python also holds takes the GIL; the process group's destructor joins those
    threads while holding the GIL. When DDP's reducer, which holds the group, was freed right after
    the last collective, the destructor ran then and the two waited for each other for good (gdb:
    the second process of a 2-process CPU run, which had nothing left to do after training).

    So, with several processes: 1. a barrier: every process is past every collective of the run, and
    its wait lets go of the GIL, so a worker still freeing an earlier collective's tensors finishes;
    2. ``release_models`` drops the DDP wrappers while the group is still registered, so freeing a
    reducer cannot be the group's last reference; 3. ``end_training`` destroys the group: the last
    reference goes in this known place, with the workers idle, and the join returns at once.

    Before the barrier the processes agree on success (an all-reduced flag, as the cancel flag is):
    a process that failed after the run's last collective (the main one alone exports: disk full)
    says so with ``succeeded=False`` instead of leaving the others in the barrier (until its exit
    fails them with gloo's "Connection closed by peer", or gloo's ~30 min timeout if it lingers);
    they then end in order too and raise a clear error. A process that failed mid-run calls
    ``end_after_error`` instead, since the others may be waiting in another collective.
    """
    others_failed = False
    if accelerator.num_processes > 1:
        others_failed = not _all_succeeded(accelerator, succeeded) and succeeded
        accelerator.wait_for_everyone()
        release_models()
        accelerator.free_memory()  # the accelerator's own references to the wrappers
        gc.collect()  # DDP wrappers sit in reference cycles: free their reducers now, not at some later collection
    accelerator.end_training()  # destroys the process group, where there is one
    if others_failed:
        raise UserError("Another training process of this run failed (its error is above); this one stopped too.")


def end_after_error(accelerator, release_models: Callable[[], None], *, after_last_collective: bool) -> None:
    """End the process group of a process whose run raised; never raises (the caller re-raises the error).

    After the run's last collective the others are heading for ``end_process_group``: agree with them
    on the failure there. Mid-run they may be waiting in another collective: skip the barrier and
    destroy the group, which closes its connections, so they fail at once instead of at gloo's timeout.
    """
    try:
        if after_last_collective:
            end_process_group(accelerator, release_models, succeeded=False)
            return
        release_models()
        if accelerator.num_processes > 1:
            accelerator.free_memory()
            gc.collect()
        accelerator.end_training()
    except Exception:  # noqa: BLE001 - the original error matters more than a failed cleanup
        log.warning("Could not end the training process group after an error", exc_info=True)


def _all_succeeded(accelerator, succeeded: bool) -> bool:
    import torch

    flag = torch.tensor([0.0 if succeeded else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started one.

    ``accelerate launch --cpu --num_processes N`` starts a single process unless MPI is configured
    (``--mpirun_hostfile``): it sets ``MASTER_ADDR`` for the N it was asked for, yet no world size.
    Training on regardless would silently be a one-process run with a different batch.
    """
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and os.environ.get("MASTER_ADDR") and world_size() == 1 and not any(os.environ.get(n) for n in _SIZE_VARS):
        raise UserError(
            "accelerate launch --cpu started one process, not the --num_processes asked for (it starts "
            "several CPU processes only through MPI). Run `accelerate launch --multi_gpu --num_processes N "
            "-m lorapg train CONFIG` instead: without CUDA the processes train on the CPU (gloo)."
        )


def check_dataset_fits(samples_per_epoch: int, batch_size: int, processes: int) -> None:
    """Every process needs a sample of its own in a step: refuse a dataset smaller than one global batch."""
    if processes > 1 and samples_per_epoch < batch_size * processes:
        raise UserError(
            f"batch_size {batch_size} on {processes} processes trains {batch_size * processes} images a step, "
            f"but an epoch has only {samples_per_epoch} (images × repeats). Lower batch_size, raise repeats, "
            "add images, or start fewer processes (--num_processes)."
        )


@dataclass(frozen=True)
class Sample:
    """One sample of a process's share: the dataset item, its weight in the loss, its noise seed."""

    item: int  # index into the run's items
    weight: float  # 1, or 0 for the padding of a process whose share of a short batch is empty
    noise_seed: int


def noise_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """A 63-bit seed for one sample's noise and timestep: the same in every process and at any process count."""
    digest = hashlib.sha256(f"lorapg-noise:{seed}:{epoch}:{batch}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def process_share(
    global_batch: list[int], *, seed: int, epoch: int, batch: int, batch_size: int, process: int
) -> list[Sample]:
    """Process ``process``'s samples of one global batch.

    A bucket's last batch can be short and leave a process nothing: it then trains the batch's first
    sample at weight 0, since DDP needs every process's backward pass in every step.
    """
    start = process * batch_size
    slots = range(start, min(start + batch_size, len(global_batch)))
    share = [Sample(global_batch[slot], 1.0, noise_seed(seed, epoch, batch, slot)) for slot in slots]
    return share or [Sample(global_batch[0], 0.0, noise_seed(seed, epoch, batch, 0))]
