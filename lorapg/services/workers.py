"""The generation workers behind the one job queue: one per device (``--devices cuda:0,cuda:1``).

Each worker is a device with its own ``DiffusionEngine`` (pipeline and LoRA state) under its own
residency budget; the job queue (lorapg/jobs.py) runs one thread per worker, all taking jobs from the
same queue, and tells each job which worker runs it. Worker 0 (the first device) is the primary one:
the model the user loads, the prompt tools, captioning and grids run there, so a single-device app is
exactly a pool of one. Built by ``build_services``; never imports gradio or torch itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Worker:
    index: int  # the job queue's worker number (Job.worker)
    device: str  # "cuda:1", "cpu": what the UI and the API show for a job it runs
    engine: Any  # its DiffusionEngine (Any: this module must not import torch)


class WorkerPool:
    """The workers in queue order; worker 0 is the primary one (``GenerationService.engine``)."""

    def __init__(self, workers: list[Worker]):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers = list(workers)

    @classmethod
    def single(cls, engine: Any) -> WorkerPool:
        """One worker on the engine's device: the app as it was before ``--devices``."""
        return cls([Worker(0, str(getattr(engine, "device", "")), engine)])

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def primary(self) -> Worker:
        return self.workers[0]

    @property
    def devices(self) -> list[str]:
        return [worker.device for worker in self.workers]

    def holding(self, ref: str) -> frozenset[int]:
        """The workers whose engine has model ``ref`` loaded (a job for it runs there without a load)."""
        return frozenset(
            worker.index
            for worker in self.workers
            if (model := worker.engine.model) is not None and model.source.ref == ref
        )

    def having(self, loras: dict[str, dict]) -> frozenset[int]:
        """The workers whose LoRA folder has every LoRA in ``loras`` (library name -> the app's file:
        {"size": bytes, "hash": its LoRA hash or None where not hashed yet}), the same file: the local
        ones read the app's own folder; a remote one has the LoRAs it last reported (``engine.lora_files``)."""
        return frozenset(
            worker.index
            for worker in list(self.workers)
            if not getattr(worker.engine, "remote", False) or _same_files(loras, worker.engine.lora_files)
        )

    def add(self, worker: Worker) -> None:
        """A worker that joined while the app runs; its index is the next one (the queue's numbering)."""
        if worker.index != len(self.workers):
            raise ValueError(f"worker {worker.index} joins a pool of {len(self.workers)}")
        self.workers.append(worker)

    def replace(self, worker: Worker) -> None:
        """A worker that joined in the slot of a lost one (``JobQueue.reusable``)."""
        self.workers[worker.index] = worker

    def engine(self, index: int | None) -> Any:
        """The engine of worker ``index`` (None, a job not started yet: the primary one)."""
        return self.workers[index or 0].engine


def _same_files(wanted: dict[str, dict], theirs: dict[str, dict]) -> bool:
    """Whether ``theirs`` holds each file of ``wanted``: the same LoRA hash where both sides know it (a
    header edit keeps it), else the same size (a LoRA retrained at another rank differs)."""
    for name, mine in wanted.items():
        other = theirs.get(name)
        if other is None:
            return False
        if mine.get("hash") and other.get("hash"):
            if mine["hash"] != other["hash"]:
                return False
        elif mine.get("size") is None or mine.get("size") != other.get("size"):
            return False
    return True
