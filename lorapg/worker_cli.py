"""``python -m lorapg worker --connect ADDRESS``: this machine's devices as generation workers of an app
elsewhere, through Ray (lorapg/services/ray_workers.py). Runs until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from lorapg.config import Settings

log = logging.getLogger(__name__)

READY = "lorapg worker ready"  # logged once every actor has built its engine and loaded its model


def add_worker_parser(commands: argparse._SubParsersAction, add_settings: Callable) -> None:
    worker = commands.add_parser(
        "worker", help="serve this machine's devices as generation workers of an app on a Ray cluster"
    )
    worker.add_argument(
        "--connect",
        required=True,
        metavar="ADDRESS",
        help="the Ray cluster's address, whose head runs on the app's machine (this machine joined it with "
        "`ray start --address ADDRESS --node-ip-address PRIVATE_IP`), or auto; private networks only: "
        "Ray's ports have no authentication (see README)",
    )
    worker.add_argument("--name", help="this worker's name in the app's list (default: host name and process id)")
    add_settings(worker)  # --devices (one actor each), --model (loaded at start), --lora-dir, ...


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from lorapg.devices import parse_devices
    from lorapg.services.ray_workers import connect, start_actors

    ray = connect(args.connect, flag="worker --connect")
    # The actors run in Ray's own processes, whose working folder is not this one: absolute folders.
    settings.lora_dir, settings.models_dir = settings.lora_dir.resolve(), settings.models_dir.resolve()
    settings.outputs = settings.outputs.resolve()
    settings.model = absolute_if_path(settings.model)
    settings.single_file_config = absolute_if_path(settings.single_file_config)
    devices = [str(device) for device in parse_devices(settings.devices, settings.device)]
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    actors = start_actors(ray, settings, devices, name)
    try:
        for info in _started(ray, actors, devices):
            log.info(
                "worker %s: model %s (%s), %d LoRA(s)", info["label"], info["model"], info["family"], len(info["loras"])
            )
        log.info("%s: %s on %s", READY, name, ", ".join(devices))
        stop.wait()  # until SIGTERM; Ctrl-C raises KeyboardInterrupt out of the wait
    finally:
        for actor in actors:
            ray.kill(actor)
        ray.shutdown()
    return 0


def absolute_if_path(ref: str | None) -> str | None:
    """``ref`` made absolute when it names an existing file or folder here (the actors' working folder is
    Ray's, where a relative path finds nothing); a hub id, or None, as it is."""
    if ref and Path(ref).exists():
        return str(Path(ref).resolve())
    return ref


def _started(ray, actors: list, devices: list[str]) -> list[dict]:
    """Each actor's ``info`` once it has built its engine and loaded its model; one that failed to is
    reported with its device (a model path missing on this machine, a device that does not exist)."""
    from ray.exceptions import GetTimeoutError, RayError

    from lorapg.errors import UserError, shorten
    from lorapg.services.ray_workers import READY_TIMEOUT_S

    infos = []
    for actor, device in zip(actors, devices, strict=True):
        try:
            infos.append(ray.get(actor.info.remote(), timeout=READY_TIMEOUT_S))
        except GetTimeoutError:  # a hung start must not leave the command waiting forever
            raise UserError(
                f"The worker on {device} did not start within {READY_TIMEOUT_S:.0f} s; check its device and --model."
            ) from None
        except RayError as exc:
            raise UserError(f"The worker on {device} did not start: {shorten(str(exc), 300)}") from None
    return infos
