"""Generation workers on other machines, through Ray (issue 20, "past one machine").

``python -m lorapg worker --connect ADDRESS`` (lorapg/worker_cli.py) joins a Ray cluster and starts
one named Ray actor per device, ``GenerationActor``: it holds its own ``DiffusionEngine``, built by
``build_engine`` exactly as the app builds its own. The app (``--ray ADDRESS``) connects as a driver,
finds those actors by name and puts one ``RemoteEngine`` per actor into its worker pool, behind the
one job queue: a job runs there as on a local device, and its images come back and are saved into the
app's gallery as local ones are. A worker whose process dies mid-job raises ``WorkerLost``; the queue
runs that job once more on another worker (lorapg/jobs.py). While the app runs, ``WorkerDiscovery``
adds workers that join the cluster later (a restarted one too) and lists the ones that left as lost.
Each worker reports the LoRAs in its own LoRA folder: a job naming a LoRA goes to a worker that has
it, and one that lacks it refuses the job naming the file and the worker (and keeps serving).

Ray is optional: it is imported only here, and only when ``--ray`` or ``worker`` is used. Never
imports gradio; torch only inside the actor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapg.config import Settings
from lorapg.errors import UserError, shorten
from lorapg.hashing import cached_lora_hash
from lorapg.jobs import WorkerLost, WorkerUnfit

log = logging.getLogger(__name__)

NAMESPACE = "lorapg"  # every worker actor and the app's driver live in this Ray namespace
ACTOR_PREFIX = "lorapg-worker:"  # a worker actor's name: ACTOR_PREFIX + worker name + ":" + device index
ACTOR_CONCURRENCY = 4  # a generation, and progress / cancel calls beside it
POLL_SECONDS = 0.1  # how often the app asks a remote worker for its progress while a job runs
# Without a timeout a hung worker (or a network that drops packets) blocks its job and queue thread forever.
INFO_TIMEOUT_S = 60.0  # an ``info`` / ``cancel`` answer (they never wait for a generation)
PROGRESS_TIMEOUT_S = 5.0  # one progress poll during a generation
MISSED_POLLS = 6  # consecutive unanswered progress polls after which the worker counts as hung (~30 s)
LOAD_TIMEOUT_S = 1800.0  # a model load on the worker (a large checkpoint over a slow disk or the hub)
READY_TIMEOUT_S = 300.0  # at app start: a worker that has not built its engine by then is left out
DISCOVERY_SECONDS = 5.0  # how often the app looks for workers that joined (or left) while it runs
JOIN_TIMEOUT_S = 10.0  # one look's wait for the workers' info, all at once; an unanswered call stays pending
STOP_CHECK_S = 0.5  # while it waits for answers, how often a look sees that the app is shutting down
# What a worker's ``info`` says that only the worker knows: discovery updates these alone. The model is
# the app's to track (its own load / generate calls), and a snapshot taken before one of those finished
# would otherwise put the older model back.
LISTING_KEYS = ("loras", "lora_files", "lora_dir", "running", "done")


def require_ray(flag: str = "--ray"):
    """The ``ray`` module; a clear message where it is not installed."""
    try:
        import ray
    except ImportError:
        raise UserError(
            f"install ray to use {flag}: pip install 'ray[default]>=2.40' (on the app and on every worker)."
        ) from None
    return ray


def connect(address: str, flag: str = "--ray"):
    """Join the Ray cluster at ``address`` as a driver (idempotent); a cluster that is not there is
    reported naming the flag."""
    ray = require_ray(flag)
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, RaySystemError, a timeout, ...
        raise UserError(
            f"{flag} {shorten(address)}: no Ray cluster answered ({shorten(str(exc), 160)}); "
            "start one with `ray start --head` and give its address."
        ) from None
    return ray


# --- the worker side ----------------------------------------------------------------------------


class GenerationActor:
    """One device's generation worker inside a Ray actor (threaded: ``ACTOR_CONCURRENCY`` calls at once,
    so ``progress`` and ``cancel`` answer while ``generate`` runs; the engine's lock keeps generations
    one at a time)."""

    def __init__(self, settings: Settings, device: str, name: str):
        import torch

        from lorapg.devices import set_cpu_threads
        from lorapg.services.build import build_worker_engine, configure_logging

        configure_logging(tracebacks=False)
        set_cpu_threads(settings.threads)
        self.name, self.label = name, f"{name}/{device}"
        # Ray hands a GPU actor its own GPU (CUDA_VISIBLE_DEVICES): inside, it is always the first one.
        local = torch.device("cuda" if device.startswith("cuda") else device)
        self.engine = build_worker_engine(settings, local)
        self.library = self.engine.library
        self._lora_index = LoraFolderIndex(self.library)
        if settings.model:
            self.engine.load_model(settings.model)
        self._progress: dict[str, tuple] = {}  # job key -> (step, total, preview, message)
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._jobs_done = 0
        import ray

        # Tells this actor from one started later under the same name (its worker process restarted).
        # None outside Ray (asking there would start a local cluster).
        self.actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None

    def info(self) -> dict:
        """What the app lists and routes by: device, loaded model and family, LoRAs (the names in this
        machine's LoRA folder, and each file's size and hash), load. Asked every discovery round: cheap."""
        model = self.engine.model
        files = self._lora_index.files()
        with self._lock:
            running = len(self._progress)
        return {
            "name": self.name,
            "label": self.label,
            "actor_id": self.actor_id,
            "pid": os.getpid(),
            # Flux dev or schnell, SD 3.5 Large or Medium: the app has no pipeline here to tell them apart.
            "defaults": _reported_defaults(model),
            "lora_dir": str(self.library.folder),
            "model": model.source.ref if model else None,
            "family": model.family if model else None,
            "native_size": model.native_size if model else None,
            "loras": list(files),
            "lora_files": files,  # name -> {"size": bytes, "hash": LoRA hash, None until hashed here}
            "running": running,
            "done": self._jobs_done,
        }

    def load(self, ref: str) -> dict:
        self.engine.load_model(ref)
        return self.info()

    def generate(self, key: str, request: Any, model_ref: str, family: str | None, loras: dict | None = None) -> Any:
        """Generate ``request`` with ``model_ref`` (loaded first when another one is resident); ``family``:
        the family the app checked the request for (None: not known there); ``loras``: the app's copies
        of its LoRAs (name -> {"size", "hash"}), which this machine's must match."""
        from lorapg.outputs import file_hashes

        self._check_loras(request, loras or {})  # before a model load: a missing file fails at once
        with self._lock:
            self._progress[key] = (0, 0, None, "")
        try:
            model = self.engine.load_model(model_ref)
            if family is not None and model.family != family:
                raise WorkerUnfit(
                    f"Worker {self.label} has {shorten(model_ref)} as a {model.family} model, but the request was "
                    f"checked for {family}; give every machine the same model files."
                )
            result = self.engine.generate(
                request, on_step=lambda *step: self._step(key, *step), should_cancel=lambda: key in self._cancelled
            )
            # Hashed here, where the files are: the app saves the images with these (lorapg/outputs.py).
            result.file_hashes = file_hashes(result)
            self._jobs_done += 1
            return result
        finally:
            with self._lock:
                self._progress.pop(key, None)
                self._cancelled.discard(key)

    def _check_loras(self, request: Any, expected: dict) -> None:
        """Every LoRA ``request`` names is in this machine's LoRA folder, the same file as the app's
        (``expected``: its hash); else a ``UserError`` (never ``WorkerUnfit``: this worker serves other
        jobs on) naming the field, the files and this worker."""
        from lorapg.hashing import lora_hash

        missing, differing = [], []
        for lora in request.loras:
            try:
                info = self.library.resolve(lora.name)
            except UserError:
                missing.append(repr(shorten(lora.name)))
                continue
            wanted = (expected.get(lora.name) or {}).get("hash")
            if wanted and lora_hash(info.path) != wanted:  # hashed once per file version (cached)
                differing.append(repr(shorten(lora.name)))
        where = f"the LoRA folder of worker {self.name!r} ({self.library.folder})"
        if missing:
            what = f"LoRA {missing[0]} is" if len(missing) == 1 else f"LoRAs {', '.join(missing)} are"
            raise UserError(
                f"loras: {what} not in {where}; copy it there (the same file as in the app's folder) or leave "
                "it out of this generation."
            )
        if differing:
            what = f"LoRA {differing[0]} differs" if len(differing) == 1 else f"LoRAs {', '.join(differing)} differ"
            raise UserError(
                f"loras: {what} in {where} from the app's copy (another file under that name: its LoRA hash "
                "differs); copy the app's file there or leave it out of this generation."
            )

    def _step(self, key: str, step: int, total: int, preview: Any = None, message: str = "") -> None:
        with self._lock:
            self._progress[key] = (step, total, preview, message)

    def progress(self, key: str) -> tuple | None:
        """(step, total, preview, message) of the generation ``key``; None when it is not running."""
        with self._lock:
            return self._progress.get(key)

    def cancel(self, key: str) -> None:
        # Recorded even when ``key`` is not running yet: the cancel may overtake its ``generate`` call
        # (both are calls on this threaded actor, in no set order), which then stops at its first step.
        # ``generate``'s finally clears it; a cancel after the end leaves one key behind (the app sends
        # none once it has the result, so only in that race).
        with self._lock:
            self._cancelled.add(key)

    def cancelling(self) -> list[str]:
        """The running generations asked to stop (they stop at their next step)."""
        with self._lock:
            return sorted(self._cancelled)


class LoraFolderIndex:
    """A worker's LoRAs as ``info`` lists them every discovery round: a walk and a stat per file; a file's
    header is read only when its size or mtime changed, so a large folder on a slow disk is not re-read
    every few seconds, and a file that is not a LoRA is logged once (per version of it), not every round."""

    def __init__(self, library):
        self.library = library  # its LoraLibrary (lorapg/diffusion/lora_library.py)
        # path -> ((size, mtime_ns), library name; None: not a LoRA)
        self._known: dict[Path, tuple[tuple[int, int], str | None]] = {}
        self._lock = threading.Lock()  # the actor answers several calls at once

    def files(self) -> dict[str, dict]:
        """Library name -> {"size": bytes, "hash": its LoRA hash once hashed on this machine, else None}
        (hashing reads the whole file: done when a job uses it, never for a listing)."""
        folder = self.library.folder
        if not folder.is_dir():
            return {}
        root, listing = folder.resolve(), {}
        with self._lock:
            known, self._known = self._known, {}
            for path in sorted(folder.rglob("*.safetensors")):
                if any(part.startswith(".") for part in path.relative_to(folder).parts):
                    continue  # hidden: the manager's trash (.trash/), other tools' caches (as LoraLibrary.scan)
                try:
                    stat = path.stat()
                except OSError:  # removed since the walk, or a dangling link
                    continue
                version = (stat.st_size, stat.st_mtime_ns)
                seen = known.get(path)
                name = seen[1] if seen is not None and seen[0] == version else self._name(path, root)
                self._known[path] = (version, name)
                if name is not None:
                    listing[name] = {"size": stat.st_size, "hash": cached_lora_hash(path)}
        return listing

    def _name(self, path: Path, root: Path) -> str | None:
        """The library name of a new (or changed) file, from its header; None, logged, for a non-LoRA."""
        try:
            if not path.resolve().is_relative_to(root):
                raise UserError(f"{path.name} links outside the LoRA folder {self.library.folder}; copy the file in.")
            return self.library.describe(path).name
        except UserError as exc:
            log.warning("skipping LoRA: %s", exc)
            return None


def start_actors(ray, settings: Settings, devices: list[str], name: str) -> list:
    """One named ``GenerationActor`` per device, pinned to this machine (its devices and its files)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor_class = ray.remote(GenerationActor)
    actors = []
    for index, device in enumerate(devices):
        actor_name = f"{ACTOR_PREFIX}{name}:{index}"
        gpus = 1 if device.startswith("cuda") else 0
        try:
            actor = actor_class.options(
                name=actor_name,
                max_concurrency=ACTOR_CONCURRENCY,
                num_cpus=1,
                num_gpus=gpus,
                scheduling_strategy=here,
            ).remote(settings, device, name)
        except ValueError:
            raise UserError(
                f"--name {shorten(name)}: a worker of that name is connected already; pick another."
            ) from None
        actors.append(actor)
    return actors


def _reported_defaults(model) -> dict | None:
    """The loaded model's recommended settings (GenerationService.with_defaults), with its ref."""
    if model is None:
        return None
    from dataclasses import asdict

    from lorapg.diffusion.flux import family_defaults

    return {"ref": model.source.ref, **asdict(family_defaults(model.family, model.pipe, model.native_size))}


# --- the app side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    ref: str


@dataclass(frozen=True)
class RemoteModel:
    """What the job path reads of a loaded model (``engine.model``), as the worker last reported it."""

    source: _Source
    family: str | None
    native_size: int | None
    defaults: dict | None = None  # the worker's _reported_defaults (None: an older worker's info)


class RemoteEngine:
    """A remote worker as the job path sees an engine: ``model``, ``device``, ``load_model`` and
    ``generate`` (with progress and cancel). A worker whose actor died raises ``WorkerLost``."""

    remote = True  # GenerationService passes the model and its family with each generation

    def __init__(self, ray, actor, info: dict, actor_name: str | None = None):
        self._ray, self._actor = ray, actor
        self._info_lock = threading.Lock()  # the queue's thread and the discovery thread both update it
        self.info = info
        self.actor_name = actor_name  # its Ray actor's name (WorkerDiscovery looks it up by that)
        self.device = f"ray:{info['label']}"  # what the UI and the API show for a job it runs

    @property
    def actor_id(self) -> str | None:
        return self.info.get("actor_id")

    @property
    def loras(self) -> list[str]:
        """The LoRA names in the worker's LoRA folder, as it last reported them."""
        return list(self.info.get("loras") or [])

    @property
    def lora_files(self) -> dict[str, dict]:
        """Name -> {"size", "hash"} of each LoRA in the worker's folder, as it last reported them."""
        return dict(self.info.get("lora_files") or {})

    @property
    def model(self) -> RemoteModel | None:
        ref = self.info.get("model")
        if ref is None:
            return None
        info = self.info
        return RemoteModel(_Source(ref), info.get("family"), info.get("native_size"), info.get("defaults"))

    def load_model(self, ref: str, on_status=None) -> RemoteModel | None:
        if on_status is not None:
            on_status(f"Loading {ref} on {self.device}…")
        self._update(self._get(self._actor.load.remote(ref), timeout=LOAD_TIMEOUT_S))
        return self.model

    def refresh(self, timeout: float = INFO_TIMEOUT_S) -> dict:
        return self._update(self._get(self._actor.info.remote(), timeout=timeout))

    def note_listing(self, info: dict) -> None:
        """What discovery learnt (its LoRAs, its load), leaving the model as this app's calls last set it."""
        self._update({key: info[key] for key in LISTING_KEYS if key in info})

    def _update(self, values: dict) -> dict:
        with self._info_lock:
            self.info = {**self.info, **values}
            return self.info

    def generate(
        self, request, on_step=None, should_cancel=None, *, model_ref: str | None = None, family=None, loras=None
    ):
        """Run ``request`` on the worker (with ``model_ref``, default the one it holds); progress goes to
        ``on_step`` and a cancel reaches the worker at its next step. ``loras``: the app's copies of the
        LoRAs it names (name -> {"size", "hash"}); the worker refuses a file of its own that differs."""
        ref = model_ref or (self.model.source.ref if self.model else None)
        if ref is None:
            raise UserError(f"Worker {self.device} has no model loaded; load one first.")
        key = uuid.uuid4().hex
        pending = self._actor.generate.remote(key, request, ref, family, loras)
        try:
            result = self._follow(pending, key, on_step, should_cancel)
        except UserError:
            # The worker may have loaded another model before refusing: the app routes by what it holds.
            self._refresh_quietly()
            raise
        self._update({"model": ref, "family": result.family})
        return result

    def _follow(self, pending, key: str, on_step, should_cancel):
        """The result of the generation ``pending``, relaying progress and a cancel while it runs."""
        cancel_sent, last, missed = False, None, 0
        while not self._wait(pending):
            if should_cancel is not None and should_cancel() and not cancel_sent:
                self._actor.cancel.remote(key)
                cancel_sent = True
            # Polled even without ``on_step``: an actor that stops answering is hung, and the job must
            # not wait for it forever.
            step, answered = self._poll(key)
            missed = 0 if answered else missed + 1
            if missed >= MISSED_POLLS:
                self._lose(f"did not answer {missed} progress polls in a row")
            if on_step is not None and step is not None and step[:2] != last and step[1]:
                last = step[:2]
                on_step(step[0], step[1], step[2])
        return self._get(pending)

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception:  # the job's own error is what the user needs; a stale view is the lesser harm
            log.warning("worker %s: could not update its state", self.device, exc_info=True)

    def _wait(self, pending) -> bool:
        """Whether ``pending`` has finished (after at most ``POLL_SECONDS``); a Ray failure loses the worker."""
        from ray import exceptions

        try:
            return bool(self._ray.wait([pending], timeout=POLL_SECONDS)[0])
        except exceptions.RayError as exc:
            self._lose(type(exc).__name__)

    def _poll(self, key: str) -> tuple[tuple | None, bool]:
        """(the worker's progress for ``key``, whether it answered within ``PROGRESS_TIMEOUT_S``)."""
        from ray import exceptions

        try:
            return self._get(self._actor.progress.remote(key), timeout=PROGRESS_TIMEOUT_S), True
        except exceptions.GetTimeoutError:
            return None, False

    def _get(self, ref, timeout: float | None = None):
        """``ray.get``: the worker's own errors as they were raised there, a worker Ray cannot reach as
        ``WorkerLost``; a call that does not answer within ``timeout`` raises ``GetTimeoutError``."""
        from ray import exceptions

        try:
            return self._ray.get(ref, timeout=timeout)
        except exceptions.GetTimeoutError:
            raise  # the caller decides (a missed progress poll is not yet a lost worker)
        except exceptions.RayTaskError as exc:  # raised by the worker's own code
            cause = exc.cause
            if isinstance(cause, UserError):  # WorkerUnfit stays itself: the queue retires the worker
                raise (WorkerUnfit if isinstance(cause, WorkerUnfit) else UserError)(str(cause)) from None
            raise RuntimeError(f"worker {self.device}: {type(cause).__name__}: {cause}") from None
        except exceptions.RayError as exc:
            # ActorDiedError; ActorUnavailableError (documented as temporary: the call "may or may not
            # have been executed", so the actor may still be generating); ObjectLostError,
            # OwnerDiedError, RaySystemError, ...
            self._lose(type(exc).__name__)

    def _lose(self, why: str):
        """Kill the actor, then raise ``WorkerLost``. The kill comes first so the job can never run
        twice: the queue re-runs it elsewhere, and an actor that was only unreachable (or hung) must
        not finish the first run too."""
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:  # already dead, or the cluster is gone: nothing left to stop
            log.debug("ray.kill of worker %s failed", self.device, exc_info=True)
        raise WorkerLost(f"Worker {self.device} stopped ({why}).")


def worker_actor_names(ray) -> list[str]:
    """The names of the lorapg worker actors alive on the cluster now, in name order (Ray releases a
    name when its actor dies)."""
    return sorted(name for name in ray.util.list_named_actors() if name.startswith(ACTOR_PREFIX))


def remote_engines(address: str, wait_s: float = 0.0, ready_s: float = READY_TIMEOUT_S) -> list[RemoteEngine]:
    """Connect to the cluster at ``address`` and return one ``RemoteEngine`` per worker actor there,
    in name order; none found is refused (the app would run without the workers it was told of)."""
    ray = connect(address)
    deadline = time.monotonic() + wait_s
    while not (names := worker_actor_names(ray)):
        if time.monotonic() >= deadline:
            raise UserError(
                f"--ray {shorten(address)}: no lorapg worker is connected to that cluster; start one with "
                "`python -m lorapg worker --connect ADDRESS`."
            )
        time.sleep(0.5)
    engines = []
    for name in names:
        actor = ray.get_actor(name)
        try:  # waits until the worker has built its engine and loaded its model
            info = RemoteEngine(ray, actor, {"label": name.removeprefix(ACTOR_PREFIX)}).refresh(ready_s)
        except WorkerLost:
            log.warning("worker %s is listed but not running; left out", name)
            continue
        except ray.exceptions.GetTimeoutError:  # the app still starts, with the workers that are ready
            log.warning("worker %s was not ready within %.0f s; left out until it is (WorkerDiscovery)", name, ready_s)
            continue
        engine = RemoteEngine(ray, actor, info, actor_name=name)
        log.info("remote worker %s: model %s (%s)", engine.device, engine.info["model"], engine.info["family"])
        engines.append(engine)
    return engines


class WorkerDiscovery:
    """The app's look-out for workers while it runs (``--ray``): a daemon thread that lists the worker
    actors on the cluster every ``interval`` seconds, through the lookup ``remote_engines`` uses at
    start. An actor the app does not have joins the queue (``GenerationService.add_worker``); one it has
    reports its LoRAs and load again (a LoRA copied there since is seen); one whose name is gone, or names
    a new actor (its worker process restarted), is listed as lost, and that new actor joins as a new worker.
    One actor that answers oddly, or cannot join, is skipped (warned about once): the others still join."""

    def __init__(self, ray, generation, interval: float = DISCOVERY_SECONDS):
        """``generation``: the GenerationService whose pool and queue the workers join."""
        self._ray, self._generation, self.interval = ray, generation, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-worker-discovery", daemon=True)
        # Actor name -> (actor, its info call not answered yet): one call per actor at a time, so a slow
        # worker (a big LoRA folder on a slow disk) is not asked again every round; its answer is read
        # in the round it arrives.
        self._asking: dict[str, tuple[Any, Any]] = {}
        self._warned: set[str] = set()  # the actors already warned about (once each)
        # The actors of lost workers: a new worker may take a lost one's slot (and its entry in the pool),
        # and a lost actor that still answers must not come back in.
        self._gone: set[str | None] = set()

    def start(self) -> WorkerDiscovery:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop looking (the app shuts down); True once the thread has ended."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.look()
            except Exception:  # a cluster hiccup must not end the look-out: the next round tries again
                log.warning("looking for Ray workers failed; trying again in %.0f s", self.interval, exc_info=True)

    def look(self) -> list[int]:
        """One round; returns the indexes of the workers that joined."""
        answers = self._ask_all(worker_actor_names(self._ray))  # name -> (actor, info or None)
        workers, lost = self._remote_workers(), set(self._lost())
        self._gone |= {engine.actor_id for index, engine in workers if index in lost}
        known = {engine.actor_id for _index, engine in workers} | self._gone
        current = {engine.actor_id: engine for index, engine in workers if index not in lost}
        joined = []
        for name, (actor, info) in answers.items():
            if info is None or self._stop.is_set():
                continue
            try:
                if info["actor_id"] in current:
                    current[info["actor_id"]].note_listing(info)  # its LoRAs and load as they are now
                elif info["actor_id"] not in known:  # a lost actor still answering is not let back in
                    joined.append(self._join(RemoteEngine(self._ray, actor, info, actor_name=name)))
            except Exception:  # one worker that cannot join must not keep the others out
                self._warn_once(name, actor, "could not join the queue; skipped", exc_info=True)
        self._drop_gone(answers)
        return joined

    def _ask_all(self, names: list[str]) -> dict[str, tuple[Any, dict | None]]:
        """Each listed actor and its ``info``; None where it has not answered yet (still building its
        engine or scanning its folder: its call stays pending for the next rounds), answered oddly or is
        dying. All calls are awaited together, ``JOIN_TIMEOUT_S`` at most."""
        listed = set(names)
        self._asking = {name: asked for name, asked in self._asking.items() if name in listed}
        for name in names:
            if name in self._asking:
                continue
            try:
                actor = self._ray.get_actor(name)
            except ValueError:  # gone since the listing
                continue
            try:
                self._asking[name] = (actor, actor.info.remote())
            except Exception:  # an actor under our prefix without ``info`` (another program's): skipped
                self._warn_once(name, actor, "has no info() to ask; skipped", exc_info=True)
        ready = self._wait([ref for _actor, ref in self._asking.values()])
        answers = {}
        for name, (actor, ref) in list(self._asking.items()):
            if ref in ready:
                del self._asking[name]
                answers[name] = (actor, self._answer(name, actor, ref))
            else:
                answers[name] = (actor, None)
        return answers

    def _wait(self, refs: list) -> list:
        """The refs of ``refs`` that are ready within ``JOIN_TIMEOUT_S`` (one deadline for all); sooner
        when the app shuts down."""
        deadline, ready = time.monotonic() + JOIN_TIMEOUT_S, []
        while refs and not self._stop.is_set():
            left = max(0.0, deadline - time.monotonic())
            done, refs = self._ray.wait(refs, num_returns=len(refs), timeout=min(left, STOP_CHECK_S))
            ready += done
            if left <= 0:
                break
        return ready

    def _answer(self, name: str, actor, ref) -> dict | None:
        """The info of an answered call; None for an error or an answer this app cannot read."""
        try:
            info = self._ray.get(ref, timeout=0)  # ready: no wait
        except self._ray.exceptions.RayError:  # the actor died or its info() raised
            log.debug("worker %s did not answer this round", name, exc_info=True)
            return None
        if not _readable_info(info):
            self._warn_once(name, actor, f"answered {shorten(repr(info), 120)}, not a worker's info; skipped")
            return None
        return info

    def _warn_once(self, name: str, actor, what: str, *, exc_info: bool = False) -> None:
        key = _actor_key(name, actor)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("Ray actor %s %s (a lorapg worker of another version?)", name, what, exc_info=exc_info)

    def _join(self, engine: RemoteEngine) -> int:
        # Asked first: a restarted worker may take the slot (and pool entry) of its lost former self.
        again = any(other.actor_name == engine.actor_name for _index, other in self._remote_workers())
        index = self._generation.add_worker(engine)
        log.info(
            "remote worker %s joined%s: model %s (%s), %d LoRA(s)",
            engine.device,
            " again (a new process under its name)" if again else "",
            engine.info.get("model"),
            engine.info.get("family"),
            len(engine.loras),
        )
        return index

    def _drop_gone(self, answers: dict) -> None:
        """Workers whose actor name is no longer listed, or now names another actor, are lost. Read
        afresh: a worker that joined this round may have taken a lost worker's slot."""
        lost = set(self._lost())
        for index, engine in self._remote_workers():
            if index in lost or engine.actor_name is None:
                continue
            answer = answers.get(engine.actor_name)
            replaced = answer is not None and answer[1] is not None and answer[1].get("actor_id") != engine.actor_id
            if answer is None or replaced:
                why = "a new process took its name" if replaced else "its actor is no longer listed"
                log.warning("remote worker %s is gone (%s)", engine.device, why)
                self._generation.lose_worker(index)

    def _remote_workers(self) -> list[tuple[int, RemoteEngine]]:
        return [
            (w.index, w.engine) for w in list(self._generation.workers.workers) if isinstance(w.engine, RemoteEngine)
        ]

    def _lost(self) -> list[int]:
        return self._generation.jobs.lost()


def _readable_info(info: Any) -> bool:
    """Whether ``info`` is what ``GenerationActor.info`` returns (an actor of another version, or another
    program's actor under the name prefix, may answer something else)."""
    return (
        isinstance(info, dict)
        and isinstance(info.get("actor_id"), str)
        and isinstance(info.get("label"), str)
        and isinstance(info.get("loras") or [], list)
        and isinstance(info.get("lora_files") or {}, dict)
    )


def _actor_key(name: str, actor) -> str:
    """One actor (a restarted worker under the same name is another one)."""
    ident = getattr(actor, "_actor_id", None)
    return f"{name}@{ident.hex()}" if callable(getattr(ident, "hex", None)) else name
