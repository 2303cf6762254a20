"""Data-parallel training: ``accelerate launch`` with 2 CPU processes (gloo) × batch 2 = 1 process × batch 4.

Every run is a subprocess, as a user starts it. ``accelerate launch --cpu --num_processes 2``
starts one process (accelerate starts several CPU processes only through MPI), so the
two-process runs use ``--multi_gpu``: torchrun underneath, and on a machine without CUDA the
Accelerator (``cpu=True``) trains on the CPU over gloo.

The dataset has two buckets of uneven size, so a global batch can be short and leave the second
process only a zero-weight pad: the equality below covers that path too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorapg.errors import UserError
from lorapg.training import distributed
from lorapg.training.checkpoints import list_checkpoints
from lorapg.training.run_store import RunStore, history_dir
from tests import gloo_probe
from tests.training_data import write_images

ROOT = Path(__file__).resolve().parent.parent
# 6 square images (global batches of 4 and 2) and 2 landscape ones (one batch of 2): 3 steps an epoch.
SIZES = [(288, 288)] * 6 + [(400, 288)] * 2
STEPS_PER_EPOCH = 3
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")


def _env(models: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        LORAPG_MODELS_DIR=str(models),
    )
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(
    tmp: Path,
    config: Path,
    *flags: str,
    processes: int = 1,
    launch: tuple[str, ...] = (),
    module="lorapg",
    timeout: int = 600,
):
    """``python -m lorapg train CONFIG`` in one process, or under ``accelerate launch`` in ``processes``;
    TimeoutExpired after ``timeout`` seconds (a hang)."""
    command = [sys.executable, "-m", module, "train", str(config), *flags]
    if processes > 1 or launch:
        launch = launch or ("--multi_gpu", "--num_processes", str(processes))
        port = ("--main_process_port", str(_free_port()))
        command = [sys.executable, "-m", "accelerate.commands.launch", *launch, *port, "-m", *command[2:]]
    return subprocess.run(
        command, cwd=tmp, env=_env(tmp / "models"), capture_output=True, text=True, timeout=timeout, check=False
    )


def write_config(path: Path, tiny_models, images: Path, **values) -> Path:
    """A run's TOML: the tiny SD 1.x model unless ``values`` names a ``model`` (then ``tiny_models`` may be None)."""
    settings = dict(
        name="zqx_ddp",
        model=str(values.get("model") or tiny_models["sd15"]),
        images=str(images),
        trigger="zqx",
        rank=4,
        alpha=4,
        unet_lr=1e-2,
        text_encoder_lr=5e-3,
        train_text_encoder=True,  # the encoders' DDP wrappers must average their gradients too
        min_snr_gamma=5,
        noise_offset=0.05,
        caption_dropout=0.4,  # which captions drop must not depend on a sample's place in a process's share
        gradient_checkpointing=False,
        save_precision="fp32",
        sample_steps=1,
        seed=11,
        cache_latents=False,
    )
    settings.update(values)
    lines = [f"{key} = {value!r}".replace("True", "true").replace("False", "false") for key, value in settings.items()]
    path.write_text("\n".join(lines).replace("'", '"') + "\n", encoding="utf-8")
    return path


def stdout_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [line for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_images")
    write_images(folder, len(SIZES), sizes=SIZES)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_models, images, tmp_path_factory):
    """1 × batch 4 straight for 2 epochs; 2 × batch 2 for 1 epoch, then resumed (2 processes) to epoch 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    one = write_config(tmp / "one.toml", tiny_models, images, epochs=2, batch_size=4, out=str(tmp / "one"))
    single = train(tmp, one)
    work = str(tmp / "work")
    first = write_config(tmp / "a.toml", tiny_models, images, epochs=1, batch_size=2, out=str(tmp / "a"), work_dir=work)
    half = train(tmp, first, processes=2, module="tests.gloo_probe")
    second = write_config(
        tmp / "b.toml", tiny_models, images, epochs=2, batch_size=2, out=str(tmp / "b"), work_dir=work
    )
    resumed = train(tmp, second, processes=2, module="tests.gloo_probe")
    return tmp, single, half, resumed


def test_two_processes_by_batch_2_train_the_lora_of_one_process_by_batch_4(runs):
    tmp, single, half, resumed = runs
    assert stdout_lines(single)[-1].split("\t")[1] == f"steps={2 * STEPS_PER_EPOCH}"
    # The main process alone prints its result line; the other prints nothing.
    assert [line.split("\t")[1] for line in stdout_lines(half)] == [f"steps={STEPS_PER_EPOCH}"]
    assert [line.split("\t")[1] for line in stdout_lines(resumed)] == [f"steps={2 * STEPS_PER_EPOCH}"]
    assert "Resuming from step-0000003" in resumed.stderr
    expected = load_file(str(tmp / "one" / "zqx_ddp.safetensors"))
    got = load_file(str(tmp / "b" / "zqx_ddp.safetensors"))
    assert expected.keys() == got.keys() and any(k.startswith("lora_te_") for k in got)
    # Tolerance: both runs make the same arithmetic on the same samples, noise and timesteps; only
    # the batch shapes (2 vs 4 rows through the UNet) and the order of the gradient sum (gloo's
    # all-reduce of two halves) differ, i.e. float32 rounding (~1e-7 relative) carried through 6
    # Adam steps, observed ~1e-7. Sharing the work wrongly (other batches or the same noise in both
    # processes) moves weights by about the weights' own size (~0.3): 1e-4 separates the two by far.
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4, msg=key)
    with safe_open(str(tmp / "b" / "zqx_ddp.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_total_batch_size"] == "4"
    assert meta["ss_max_train_steps"] == str(2 * STEPS_PER_EPOCH)


def test_one_set_of_outputs_checkpoints_and_samples(runs):
    tmp, _, _, _ = runs
    assert sorted(p.name for p in (tmp / "a").iterdir()) == ["zqx_ddp.safetensors"]
    assert sorted(p.name for p in (tmp / "b").rglob("*.safetensors")) == ["zqx_ddp.safetensors"]
    assert [p.name for p in list_checkpoints(tmp / "work")] == ["step-0000003", "step-0000006"]
    assert sorted(p.name for p in (tmp / "work" / "samples").iterdir()) == ["epoch-0001.png", "epoch-0002.png"]
    assert not list((tmp / "work").rglob("*.partial"))


def test_a_run_of_two_processes_is_one_run_in_the_history(runs):
    tmp, _, _, _ = runs
    # Three runs (one of 1 process, two of 2): the main process alone records each, once, with its LoRA.
    history = RunStore(history_dir(tmp / "models") / "runs.sqlite3")
    try:
        recorded = history.runs()
    finally:
        history.close()
    assert [(run.status, run.lora_path and Path(run.lora_path).parent.name) for run in recorded] == [
        ("done", "one"),
        ("done", "a"),
        ("done", "b"),
    ]


def test_each_process_ends_its_process_group_before_its_models_go(runs):
    # The group ends in end_process_group (after a barrier, with the DDP reducers released), not when a
    # reducer happens to be freed: its gloo threads are joined by then, in both processes of both runs.
    for proc in runs[2:]:
        # A progress bar may end its line without a newline: the probe's line is what follows the prefix.
        prefix = gloo_probe.PREFIX
        probes = [line[line.index(prefix) :] for line in proc.stderr.splitlines() if prefix in line]
        assert probes == [f"{prefix} []"] * 2, proc.stderr[-3000:]


def test_a_checkpoint_resumes_only_with_its_process_count(runs, tiny_models, images):
    tmp = runs[0]
    config = write_config(
        tmp / "c.toml", tiny_models, images, epochs=3, batch_size=2, out=str(tmp / "c"), work_dir=str(tmp / "work")
    )
    proc = train(tmp, config)
    assert proc.returncode != 0
    assert "made by 2 training process(es), this run has 1: launch it with --num_processes 2" in proc.stderr


def test_a_dataset_smaller_than_one_global_batch_is_refused_by_name(tiny_models, images, tmp_path):
    small = tmp_path / "small"
    write_images(small, 3)
    config = write_config(tmp_path / "s.toml", tiny_models, small, epochs=1, batch_size=2, out=str(tmp_path / "s"))
    proc = train(tmp_path, config, processes=2)
    assert proc.returncode != 0
    assert "batch_size 2 on 2 processes trains 4 images a step, but an epoch has only 3" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_a_failed_export_on_the_main_process_ends_both_processes(tiny_models, images, tmp_path):
    # The main process alone writes the LoRA: an output "folder" that is a file fails its export after the
    # last training step. The other process must not wait for it at the end-of-run barrier until gloo's
    # timeout (~30 min). torchrun would kill it once the main one failed, so the two processes are started
    # here with torchrun's variables but no launcher (as on two hosts): each must end by itself.
    (tmp_path / "blocked").write_text("not a folder", encoding="utf-8")
    out = str(tmp_path / "blocked")
    config = write_config(tmp_path / "x.toml", tiny_models, images, epochs=1, batch_size=2, out=out)
    base = _env(tmp_path / "models") | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    command = [sys.executable, "-m", "lorapg", "train", str(config)]
    procs = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=base | {"RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        errors = [proc.communicate(timeout=300)[1] for proc in procs]  # TimeoutExpired is the failure
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode != 0 and "blocked" in errors[0], errors[0][-3000:]
    assert procs[1].returncode == 2, errors[1][-3000:]
    assert "Another training process of this run failed (its error is above); this one stopped too." in errors[1]
    assert (tmp_path / "blocked").read_text(encoding="utf-8") == "not a folder"


def test_accelerate_cpu_flag_that_starts_one_process_is_refused(tiny_models, images, tmp_path):
    config = write_config(tmp_path / "t.toml", tiny_models, images, epochs=1, out=str(tmp_path / "t"))
    proc = train(tmp_path, config, launch=("--cpu", "--num_processes", "2"))
    assert proc.returncode != 0
    assert "accelerate launch --cpu started one process" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "t").exists()


def test_process_share_splits_a_global_batch_and_pads_an_empty_share():
    shares = [distributed.process_share([5, 6, 7], seed=1, epoch=0, batch=2, batch_size=2, process=p) for p in (0, 1)]
    assert [s.item for s in shares[0]] == [5, 6] and [s.item for s in shares[1]] == [7]
    alone = distributed.process_share([5, 6, 7], seed=1, epoch=0, batch=2, batch_size=4, process=0)
    # A sample's noise seed follows it, not the process that trains it.
    assert [s.noise_seed for s in alone] == [s.noise_seed for share in shares for s in share]
    pad = distributed.process_share([5, 6], seed=1, epoch=0, batch=2, batch_size=2, process=1)
    assert [(s.item, s.weight) for s in pad] == [(5, 0.0)]


def test_check_launch_reads_the_launchers_environment(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    distributed.check_launch()  # a plain run
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(UserError, match="--multi_gpu"):
        distributed.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.check_launch()  # torchrun's processes
    assert distributed.world_size() == 2 and not distributed.is_main_process()
