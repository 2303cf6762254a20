"""The same repo as a Hugging Face Space: front matter, `spaces` before torch, GPU functions that
relay through a forked process as ZeroGPU runs them, and visitors who never see each other's work."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from gradio_client import Client
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image

from lorapg.config import load_settings
from lorapg.demo.judge import judge_image
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from lorapg.gallery import GalleryStore, ImageRecord
from lorapg.hosting.gpu_estimates import generation_seconds, planned_training_steps, training_seconds
from lorapg.hosting.space_policy import SPACE_MAX_UPLOAD_MB, server_host, space_policy
from lorapg.hosting.visitors import Visitors
from lorapg.hosting.zerogpu import MAX_GPU_SECONDS, GpuTask, gpu_seconds
from lorapg.jobs import Job
from lorapg.services.gallery import GalleryService
from lorapg.services.generation import GenerationService
from lorapg.working_state import VisitorWorkingStates
from tests.app_server import ROOT, running_app
from tests.tiny_models import tiny_runtime

ZERO_GPU_TORCH = [Version(f"2.{minor}.0") for minor in range(8, 12)]  # what ZeroGPU accepts (Nov 2026)


# --------------------------------------------------------------------------------------------
# Front matter and requirements


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the Space configuration must open README.md"
    block = text[4 : text.index("\n---\n", 4)]
    return yaml.safe_load(block)


def requirements(path: Path) -> dict[str, Requirement]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            found[requirement.name.lower()] = requirement
    return found


def test_readme_front_matter_configures_a_gradio_space_that_matches_requirements():
    config = front_matter()
    pinned = requirements(ROOT / "requirements.txt")
    assert config["sdk"] == "gradio"
    gradio_pin = str(pinned["gradio"].specifier)
    assert gradio_pin.startswith("==") and config["sdk_version"] == gradio_pin[2:]
    assert (ROOT / config["app_file"]).is_file() and config["app_file"] == "app.py"
    assert re.fullmatch(r"3\.1[0-9]", str(config["python_version"]))
    assert 0 < len(config["short_description"]) <= 60  # the Hub refuses longer ones
    assert config.get("suggested_hardware") in {"cpu-basic", "zero-a10g", "t4-small", "l4x1", "a10g-small"}
    # ZeroGPU rejects a requirements file that rules out every torch it supports.
    assert any(pinned["torch"].specifier.contains(v) for v in ZERO_GPU_TORCH)
    assert "xformers" not in pinned and not any("cu12" in str(r.url or "") for r in pinned.values())
    assert "spaces" in requirements(ROOT / "requirements-dev.txt")


# --------------------------------------------------------------------------------------------
# `spaces` is imported first, and only on a Space

_IMPORT_ORDER = """
import importlib.abc, sys
order = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("spaces", "torch") and name not in order:
            order.append(name)
        return None
sys.meta_path.insert(0, Watch())
import app  # whatever it imports comes in its own order
import torch  # noqa: F401  (what the app builds next)
import lorapg.hosting.zerogpu as glue
print(order, glue._spaces is not None)
"""


@pytest.mark.parametrize(("system", "expected"), [("spaces", "['spaces', 'torch'] True"), ("", "['torch'] False")])
def test_app_imports_spaces_before_torch_on_a_space_and_never_elsewhere(system, expected):
    env = {"SYSTEM": system, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    output = subprocess.run(
        [sys.executable, "-c", _IMPORT_ORDER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert output.strip().splitlines()[-1] == expected


def test_gpu_seconds_follow_the_request_and_stay_within_what_zerogpu_accepts():
    small, large = generation_seconds(20, 512, 512), generation_seconds(40, 1024, 1024, batch_size=4)
    assert small < large
    assert gpu_seconds(small) >= 10 and gpu_seconds(10**6) == MAX_GPU_SECONDS
    assert planned_training_steps(images=10, repeats=2, epochs=3, batch_size=4, max_steps=0) == 15
    assert planned_training_steps(images=10, repeats=2, epochs=3, batch_size=4, max_steps=7) == 7
    assert training_seconds(100, 512) < training_seconds(100, 1024) < training_seconds(400, 1024)


# --------------------------------------------------------------------------------------------
# GpuTask: the ZeroGPU path, through a real fork


_END = "end"


def forking_gpu(function):
    """What ``spaces.GPU`` does on ZeroGPU, without the GPU: the generator runs in a forked
    process; its arguments and every item it yields cross the boundary pickled."""

    def call(*args, **kwargs):
        payload = pickle.dumps((args, kwargs))  # unpicklable arguments fail here, as on ZeroGPU
        context = multiprocessing.get_context("fork")
        results = context.SimpleQueue()

        def child():
            call_args, call_kwargs = pickle.loads(payload)
            for item in function(*call_args, **call_kwargs):
                results.put(pickle.dumps(item))
            results.put(_END)

        process = context.Process(target=child, daemon=True)
        process.start()
        try:
            while (item := results.get()) != _END:
                yield pickle.loads(item)
        finally:
            process.join(60)

    return call


def test_gpu_task_relays_progress_result_and_user_errors_from_a_forked_process():
    def work(n, *, report, should_cancel):
        if n < 0:
            raise UserError("n must not be negative")
        for step in range(1, n + 1):
            report(step, n)
        return {"pid": __import__("os").getpid(), "n": n}

    task = GpuTask(work, lambda n: 1, relay=True, decorator=forking_gpu)
    seen = []
    result = task.run(3, report=lambda *progress: seen.append(progress), should_cancel=lambda: False)
    assert seen == [(1, 3), (2, 3), (3, 3)] and result["n"] == 3
    assert result["pid"] != __import__("os").getpid()  # it really ran elsewhere
    with pytest.raises(UserError, match="must not be negative"):
        task.run(-1, report=lambda *progress: None, should_cancel=lambda: False)


def test_a_refusal_from_zerogpu_itself_reaches_the_visitor_as_a_clear_message():
    def out_of_quota(function):
        def call(*args, **kwargs):
            raise RuntimeError("You have exceeded your GPU quota (60s requested vs. 12s left).")
            yield  # a generator, as spaces.GPU makes it

        return call

    task = GpuTask(lambda *, report, should_cancel: "never", lambda: 1, relay=True, decorator=out_of_quota)
    with pytest.raises(UserError, match=r"GPU is not available: You have exceeded your GPU quota"):
        task.run(report=lambda *progress: None, should_cancel=lambda: False)


def test_work_longer_than_one_zerogpu_call_is_refused_before_any_quota_is_spent():
    calls = []

    def recording_gpu(function):
        calls.append(function)
        return forking_gpu(function)

    task = GpuTask(
        lambda *, report, should_cancel: "done", lambda: MAX_GPU_SECONDS + 100, relay=True, decorator=recording_gpu
    )
    with pytest.raises(UserError, match=r"about 400 s of GPU time.*lower the steps"):
        task.run(report=lambda *progress: None, should_cancel=lambda: False)
    quick = GpuTask(lambda *, report, should_cancel: "done", lambda: 30, relay=True, decorator=forking_gpu)
    assert quick.run(report=lambda *progress: None, should_cancel=lambda: False) == "done"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return tiny_runtime(tmp_path_factory.mktemp("spaces-runtime"))


class HeldService(GenerationService):
    """The ZeroGPU path with a hold the test controls: on the GPU side the work stops after reporting
    ``hold_at`` until ``released(should_cancel)`` is true, so what the caller saw by then is known."""

    hold_at: int | None = None
    released: Callable[[Callable[[], bool]], bool] = staticmethod(lambda should_cancel: True)

    def _generate_on_device(self, model_ref, request, *, report, should_cancel):
        def held_report(step, total, *rest):
            report(step, total, *rest)
            if step == self.hold_at:
                # Waits on the test's signal; the bound only keeps a broken relay from hanging the suite.
                for _ in range(12000):
                    if self.released(should_cancel):
                        return
                    time.sleep(0.005)
                raise RuntimeError(f"step {step} never reached the caller")

        return super()._generate_on_device(model_ref, request, report=held_report, should_cancel=should_cancel)


@pytest.fixture()
def reports(monkeypatch):
    """Every progress report each job receives in the app's process, in order; ``on_report`` hooks
    run inside ``Job.report`` itself (the moment the relay delivers a step)."""
    seen: dict[str, list[int]] = {}
    hooks: list[Callable[[Job, int], None]] = []
    original = Job.report

    def recording(job, step, total, preview=None, message=""):
        original(job, step, total, preview, message)
        seen.setdefault(job.id, []).append(step)
        for hook in hooks:
            hook(job, step)

    monkeypatch.setattr(Job, "report", recording)
    return seen, hooks


def test_generation_through_the_zerogpu_path_gives_the_same_pixels_and_can_be_cancelled(runtime, reports):
    request = GenerationRequest(
        prompt="a lighthouse", loras=(LoraRequest("style", 0.8),), steps=10, seed=5, width=64, height=64
    )
    direct = runtime.service.generate(request)
    relayed = HeldService(
        runtime.settings, runtime.engine, runtime.library, runtime.jobs, gpu_relay=True, gpu_decorator=forking_gpu
    )
    seen, hooks = reports

    # The GPU side holds after step 5 until the app's process has received step 5: progress is
    # relayed while the work runs, not after it.
    arrived = multiprocessing.get_context("fork").Event()
    relayed.hold_at, relayed.released = 5, lambda should_cancel: arrived.is_set()
    hooks.append(lambda job, step: step == 5 and arrived.set())
    job = relayed.submit_generation(request)
    assert job.wait(120) and job.status == "done", job.error
    assert seen[job.id] == list(range(1, 11))  # every step, in order
    assert np.array_equal(np.asarray(direct.images[0]), np.asarray(job.result.images[0]))  # same request

    # Cancel as step 2 arrives; the GPU side holds after step 3 until it sees the cancel flag.
    hooks[:] = [lambda job, step: step == 2 and relayed.cancel(job.id)]
    relayed.hold_at, relayed.released = 3, lambda should_cancel: should_cancel()
    job = relayed.submit_generation(GenerationRequest(prompt="long", steps=50, seed=1, width=128, height=128))
    job.wait(120)
    assert job.status == "cancelled" and job.result.cancelled
    # What it had comes back from the GPU side (the REST API's interrupt returns it); nothing is saved.
    assert len(job.result.images) == 1 and job.result.saved == []
    assert seen[job.id] == [1, 2, 3]  # stopped at the first step after the flag reached the GPU side


def test_the_real_spaces_decorator_off_zerogpu_leaves_the_relay_working(runtime, monkeypatch):
    """With `spaces` installed on a CPU machine, ``spaces.GPU`` hands the function back unchanged."""
    spaces = pytest.importorskip("spaces")
    relayed = GenerationService(
        runtime.settings,
        runtime.engine,
        runtime.library,
        runtime.jobs,
        gpu_relay=True,
        gpu_decorator=spaces.GPU(duration=lambda *args: 30),
    )
    result = relayed.generate(GenerationRequest(prompt="a hill", steps=3, seed=2, width=64, height=64))
    assert result.seeds == [2] and len(result.images) == 1


# --------------------------------------------------------------------------------------------
# Space policy, visitors, per-visitor state


def test_space_policy_is_private_and_bounded_on_a_space_and_unchanged_locally():
    settings = load_settings(None, {}, environ={})
    local = space_policy(settings, environ={})
    assert not local.private_visitors and local.max_upload_bytes is None and local.train_max_steps is None
    space = space_policy(settings, environ={"SYSTEM": "spaces", "SPACE_ID": "me/lorapg"}, has_gpu=False)
    assert space_policy(settings, environ={"SYSTEM": "spaces"}, has_gpu=True).train_max_steps is None  # paid GPU
    assert space.private_visitors and space.settings_locked and space.space_id == "me/lorapg"
    assert space.max_upload_bytes == SPACE_MAX_UPLOAD_MB * 1024 * 1024 and space.train_max_steps
    zero = space_policy(settings, environ={"SYSTEM": "spaces", "SPACES_ZERO_GPU": "true"})
    assert zero.zero_gpu and zero.train_max_steps >= space.train_max_steps
    assert server_host(settings, space, environ={}) == "0.0.0.0" and server_host(settings, local) == "127.0.0.1"
    owner_set = load_settings(None, {"visitors": "shared", "max_upload_mb": 5, "train_max_steps": 0}, environ={})
    overridden = space_policy(owner_set, environ={"SYSTEM": "spaces"})
    assert not overridden.private_visitors and overridden.max_upload_bytes == 5 * 1024 * 1024
    assert overridden.settings_locked  # a shared gallery does not hand strangers the LLM URL or model paths
    assert overridden.train_max_steps is None
    with pytest.raises(UserError, match="visitors"):
        space_policy(load_settings(None, {"visitors": "everyone"}, environ={}), environ={})


def test_visitors_keep_their_browser_id_and_private_mode_names_everyone():
    visitors = Visitors(private=True)
    kept = visitors.open_page("session-a", None)
    assert re.fullmatch(r"[0-9a-f]{32}", kept)
    assert visitors.open_page("session-b", kept) == kept  # a reload: same browser, same visitor
    assert visitors.owner("session-a") == visitors.owner("session-b") == f"browser:{kept}"
    assert visitors.open_page("session-c", "../../etc") != "../../etc"  # not ours: replaced
    assert visitors.owner("api-session") == "session:api-session"
    assert visitors.owner("session-a", username="alice") == "user:alice"
    assert Visitors(private=False).owner("session-a") is None


def test_each_visitor_has_their_own_working_state(tmp_path):
    states = VisitorWorkingStates(tmp_path / "states")
    states.for_owner("browser:a").update(prompt="a red fox")
    states.for_owner("browser:b").update(prompt="a blue whale")
    assert states.for_owner("browser:a").load().prompt == "a red fox"
    assert VisitorWorkingStates(tmp_path / "states").for_owner("browser:b").load().prompt == "a blue whale"
    assert all("browser" not in path.name for path in (tmp_path / "states").iterdir())


def _image(color: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (color, color, color))


def test_gallery_owners_see_only_their_images_unless_the_gallery_is_shared(tmp_path):
    store = GalleryStore(tmp_path / "g.sqlite3", tmp_path / "images", keep=2)
    mine = [store.add(ImageRecord(prompt=f"mine {i}", seed=i), _image(i), owner="a") for i in range(3)]
    theirs = store.add(ImageRecord(prompt="theirs", seed=9), _image(9), owner="b")
    # Pruning keeps the newest two of each owner: b's one image is not pushed out by a's three.
    assert [r.prompt for r in store.list(owner="a")] == ["mine 2", "mine 1"]
    assert [r.prompt for r in store.list(owner="b")] == ["theirs"]
    assert not mine[0].path.exists()

    private = GalleryService(store, library=None)
    assert [r.id for r in private.list(owner="b")] == [theirs.id]
    for act in (
        lambda: private.get(theirs.id, "a"),
        lambda: private.delete(theirs.id, "a"),
        lambda: private.toggle_star(theirs.id, "a"),
        lambda: private.show(theirs.id, "a"),
    ):
        with pytest.raises(UserError, match=f"No image with id {theirs.id}"):
            act()
    shared = GalleryService(store, library=None, shared=True)
    assert len(shared.list(owner="a")) == 3 and shared.get(theirs.id, "a").prompt == "theirs"
    with pytest.raises(UserError, match="another visitor"):
        shared.delete(theirs.id, "a")
    shared.delete(theirs.id, "b")
    assert store.list(owner="b") == []


def test_a_version_1_gallery_is_migrated_and_keeps_its_images_for_everyone(tmp_path):
    db = tmp_path / "old.sqlite3"
    store = GalleryStore(db, tmp_path / "images")
    store.add(ImageRecord(prompt="from before", seed=1), _image(1))
    with sqlite3.connect(db) as conn:  # make it look like a database written before owners existed
        conn.execute("DROP INDEX images_by_owner")
        conn.execute("ALTER TABLE images DROP COLUMN owner")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    migrated = GalleryStore(db, tmp_path / "images")
    assert [r.prompt for r in migrated.list()] == ["from before"]
    assert migrated.list(owner="someone") == []
    migrated.add(ImageRecord(prompt="new", seed=2), _image(2), owner="someone")
    assert [r.prompt for r in migrated.list(owner="someone")] == ["new"]


FAST_TRAINING = {
    "rank": 4,
    "alpha": 4,
    "epochs": 1,
    "sample_steps": 1,
    "gradient_checkpointing": False,
    "batch_size": 2,
}


# Set to a test's node id in the fresh pytest process that test starts for itself (below).
FRESH_PROCESS = "LORAPG_FRESH_PROCESS_TEST"


def rerun_in_a_fresh_process(request, tmp_path) -> bool:
    """Run this test again in a new pytest process; True when this call is that new process.

    torch refuses backward() in a child forked from a process that already ran one (autograd's
    threads do not survive fork: "Unable to handle autograd's threading in combination with
    fork-based multiprocessing"). ZeroGPU's main process never trains, but an xdist worker may have
    trained in-process before this module, depending on which modules it was handed.
    """
    if os.environ.get(FRESH_PROCESS) == request.node.nodeid:
        return True
    env = {**os.environ, FRESH_PROCESS: request.node.nodeid}
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    command += [f"--basetemp={tmp_path / 'fresh'}", request.node.nodeid]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert re.search(r"\b1 passed", done.stdout), done.stdout[-2000:]
    return False


def test_training_is_bounded_relayed_from_a_fork_and_datasets_belong_to_their_visitor(request, tmp_path):
    if not rerun_in_a_fresh_process(request, tmp_path):
        return
    runtime = request.getfixturevalue("runtime")
    from lorapg.services.training import TrainingService
    from tests.training_data import write_images

    service = TrainingService(
        runtime.settings, runtime.jobs, runtime.engine, max_steps=5, gpu_relay=True, gpu_decorator=forking_gpu
    )
    service.dataset_add("cats", write_images(tmp_path / "upload", 3), owner="browser:a")
    assert service.dataset_names("browser:a") == ["cats"]
    assert service.dataset_names("browser:b") == [] and "cats" not in service.dataset_names()
    with pytest.raises(UserError, match="No dataset named 'cats'"):
        service.dataset_folder("cats", "browser:b")
    images = str(service.dataset_folder("cats", "browser:a"))
    base = {**FAST_TRAINING, "name": "bounded", "trigger": "zqx", "images": images}
    with pytest.raises(UserError, match="limit of 5"):
        service.prepare(service.config_for({**base, "max_steps": 50}))

    run = service.submit(service.config_for(base), owner="browser:a")
    assert run.config.max_steps == 5  # "all epochs" became the limit
    assert run.job.wait(600) and run.job.status == "done", run.job.error
    assert run.result.lora_path.is_file() and run.losses and run.samples  # progress came back from the fork
    assert service.latest_run("browser:a") is run and service.latest_run("browser:b") is None
    with pytest.raises(UserError, match="No training run"):
        service.run(run.job.id, "browser:b")
    # LoRAs are shared: no visitor trains over an existing one (theirs, another's or the owner's).
    with pytest.raises(UserError, match="does not replace LoRAs"):
        service.submit(service.config_for({**base, "overwrite": True}), owner="browser:b")
    assert run.result.lora_path.is_file()


# --------------------------------------------------------------------------------------------
# The app as a Space, end to end

GENERATE = {
    "negative_prompt": "",
    "loras": "",
    "steps": 20,
    "cfg_scale": 7,
    "sampler": "Euler a",
    "width": 32,
    "height": 32,
    "batch_size": 1,
}
PROMPTS = {"alice": ("star", "red", "blue"), "bob": ("cross", "white", "black")}


@pytest.fixture(scope="module")
def space_app(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    loras = root / "loras"
    shutil.copytree(tiny_models["loras"], loras)
    env = {
        "SYSTEM": "spaces",
        "SPACE_ID": "tester/lorapg",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        # No LORAPG_MODEL: a CPU Space runs the bundled demo model, as a fresh Space would.
        "LORAPG_LORA_DIR": str(loras),
        "LORAPG_OUTPUTS": str(root / "outputs"),
        "LORAPG_THREADS": "1",
        "GRADIO_SSR_MODE": "False",
    }
    with running_app(env=env) as url:
        yield {"url": url, "outputs": root / "outputs", "tiny": tiny_models}


def gallery_ids(client: Client) -> list[int]:
    items, _count = client.predict("", "", api_name="/gallery_list")
    return [int(item["caption"].split()[0].lstrip("#")) for item in items]


def test_a_space_serves_the_model_and_visitors_never_see_each_others_images(space_app):
    alice, bob = Client(space_app["url"], verbose=False), Client(space_app["url"], verbose=False)
    results = {}

    def generate(name, client, seed):
        shape, colour, background = PROMPTS[name]
        results[name] = client.predict(
            prompt=f"a {colour} {shape} on a {background} background", seed=seed, api_name="/generate", **GENERATE
        )

    threads = [threading.Thread(target=generate, args=args) for args in (("alice", alice, 1), ("bob", bob, 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert results["alice"][2] == 1 and results["bob"][2] == 2
    assert "Seed: 1" in Image.open(results["alice"][0][0]["image"]).text["parameters"]
    for name, expected in PROMPTS.items():  # the demo model drew what each visitor asked for
        verdict = judge_image(Image.open(results[name][0][0]["image"]))
        assert (verdict.shape, verdict.colour, verdict.background) == expected, (name, verdict)

    alice_ids, bob_ids = gallery_ids(alice), gallery_ids(bob)
    assert len(alice_ids) == 1 and len(bob_ids) == 1 and set(alice_ids).isdisjoint(bob_ids)
    assert alice.predict(alice_ids[0], api_name="/gallery_get")[0] == alice_ids[0]
    with pytest.raises(Exception, match="No image with id"):
        bob.predict(alice_ids[0], api_name="/gallery_get")
    with pytest.raises(Exception, match="No image with id"):
        bob.predict(alice_ids[0], "", "", api_name="/gallery_delete")
    assert gallery_ids(alice) == alice_ids  # still there
    with pytest.raises(Exception, match="Unknown job id"):
        bob.predict(results["alice"][3], api_name="/cancel")  # another visitor's job is not bob's to cancel
    # Only image files are served: the database (every visitor's prompts and ids) and the secret never.
    for private in ("gallery.sqlite3", ".visitor_secret"):
        path = (space_app["outputs"] / private).resolve()
        assert path.is_file()
        response = httpx.get(f"{space_app['url'].rstrip('/')}/gradio_api/file={path}")
        assert response.status_code in (403, 404), (private, response.status_code)
    with sqlite3.connect(space_app["outputs"] / "gallery.sqlite3") as conn:
        owners = {row[0] for row in conn.execute("SELECT owner FROM images")}
    assert len(owners) == 2 and None not in owners


def test_a_space_keeps_app_wide_settings_for_its_owner(space_app):
    client = Client(space_app["url"], verbose=False)
    with pytest.raises(Exception, match="fixed by its owner"):
        client.predict("openai", "m", "http://169.254.169.254/v1", "", api_name="/llm_settings")
    with pytest.raises(Exception, match="offers only the models in its list"):
        client.predict("/etc", api_name="/load_model")
