"""A GGUF-quantized Flux.1 / SD 3.5 transformer (as city96's FLUX.1-dev-gguf ships them) through the
user's path: ``--model file.gguf --model-config tiny_folder``, generating on CPU with diffusers' torch
dequantization.

The .gguf files are written here with ``gguf.GGUFWriter``: 2-D weights whose rows split into Q8_0 blocks
(32 values) are quantized to Q8_0 with ``gguf.quants.quantize``, 1-D tensors stay F32 and the rest
(the 16-wide ``x_embedder``, SD 3's conv patch embedding) F16, as city96's converter keeps small tensors.
The tensors carry diffusers' names, which diffusers loads without conversion. BFL's names (what the
published files use) go through diffusers' Flux converter, which hard-codes FLUX.1's width (3072) when it
splits ``single_blocks.N.linear1``, so no tiny model can take that route; BFL names are covered for
family detection and the guidance-input check, which read names only.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from huggingface_hub import constants

from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.families import FLUX, SD3
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.model_source import SINGLE_FILE, resolve_model_source
from lorapg.diffusion.quantization import FP8, NONE, QuantizePlan, is_quantized
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.errors import UserError
from tests.tiny_flux import build_flux_pipeline, build_sd3_pipeline, save_peft_transformer_lora, save_transformer_file

gguf = pytest.importorskip("gguf")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q8_BLOCK = gguf.GGML_QUANT_SIZES[Q8_0][0]
# Q8_0 keeps each block of 32 weights as int8 times one fp16 scale (the block's largest magnitude / 127):
# each weight is off by at most about half a step, so under max|W| / 127 per tensor.
Q8_STEPS = 127
# Through the tiny model's 3 steps that moved pixels by 1 level of 255 when written; 6 leaves room for other
# CPUs' kernels. The tiny images are not sensitive to every weight (a to_q tripled moves them by 1-2
# levels), so the weights themselves are compared too (test_gguf_weights_are_the_model_s_within_q8_0).
MAX_LEVELS = 6


def write_gguf(path, state: dict[str, torch.Tensor], arch: str = "flux"):
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, tensor in state.items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[-1] % Q8_BLOCK == 0:
            packed = gguf.quants.quantize(array, Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=Q8_0)
        elif array.ndim == 1:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    flux = build_flux_pipeline(root / "flux")
    save_peft_transformer_lora(root / "loras" / "flux_style.safetensors", flux, seed=1)
    write_gguf(root / "flux-Q8_0.gguf", flux.transformer.state_dict())
    save_transformer_file(root / "flux-transformer.safetensors", flux)
    sd3 = build_sd3_pipeline(root / "sd3")
    write_gguf(root / "sd3-Q8_0.gguf", sd3.transformer.state_dict(), arch="sd3")
    return {"root": root, "flux": root / "flux", "sd3": root / "sd3", "loras": root / "loras"}


def make_engine(files, config=None, **kwargs) -> DiffusionEngine:
    return DiffusionEngine(
        LoraLibrary(files["loras"]), torch.device("cpu"), torch.float32, single_file_config=config, **kwargs
    )


@pytest.fixture(scope="module")
def folder_engine(files) -> DiffusionEngine:
    engine = make_engine(files)
    engine.load_model(str(files["flux"]))
    return engine


@pytest.fixture(scope="module")
def gguf_engine(files) -> DiffusionEngine:
    engine = make_engine(files, str(files["flux"]))
    engine.load_model(str(files["root"] / "flux-Q8_0.gguf"))
    return engine


def pixels(engine: DiffusionEngine, loras=()) -> np.ndarray:
    request = GenerationRequest(
        prompt="a red fox",
        loras=tuple(LoraRequest(name, scale) for name, scale in loras),
        steps=3,
        seed=7,
        sampler="Euler",
    )
    return np.stack([np.asarray(image, dtype=np.int16) for image in engine.generate(request).images])


def test_flux_gguf_is_detected_and_generates_close_to_the_unquantized_model(files, gguf_engine, folder_engine):
    source = resolve_model_source(str(files["root"] / "flux-Q8_0.gguf"))
    assert (source.kind, source.family) == (SINGLE_FILE, FLUX)
    assert gguf_engine.model.family == FLUX
    transformer = gguf_engine.model.pipe.transformer
    weight = transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.quant_type == Q8_0  # stays quantized in memory
    assert transformer.x_embedder.weight.dtype == torch.float32  # an F16 tensor, loaded in the app's dtype
    assert is_quantized(transformer) and not gguf_engine.model.adapters.fuser.enabled
    difference = np.abs(pixels(gguf_engine) - pixels(folder_engine))
    assert difference.max() <= MAX_LEVELS


def test_gguf_weights_are_the_model_s_within_q8_0(gguf_engine, folder_engine):
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    original = folder_engine.model.pipe.transformer.state_dict()
    loaded = dict(gguf_engine.model.pipe.transformer.named_parameters())
    assert loaded.keys() == original.keys()
    for name, parameter in loaded.items():
        expected = original[name].float()
        quantized = type(parameter).__name__ == "GGUFParameter"
        actual = dequantize_gguf_tensor(parameter) if quantized else parameter.detach()
        # F16 tensors (not Q8_0-able) round to 11 bits; F32 ones are the same numbers.
        atol = expected.abs().max().item() / (Q8_STEPS if quantized else 1000)
        torch.testing.assert_close(actual.float(), expected, rtol=0, atol=atol, msg=name)


def test_lora_on_a_gguf_base_runs_unfused_and_scale_zero_is_the_base(gguf_engine):
    base = pixels(gguf_engine)
    assert np.array_equal(pixels(gguf_engine, loras=[("flux_style", 0.0)]), base)
    assert np.abs(pixels(gguf_engine, loras=[("flux_style", 1.0)]) - base).max() > 10
    assert np.array_equal(pixels(gguf_engine), base)  # the quantized weights were never touched


def test_quantize_setting_skips_a_gguf_transformer_with_a_note(files):
    engine = make_engine(files, str(files["flux"]), quantize=QuantizePlan(transformer=FP8, t5=NONE))
    notes: list[str] = []
    engine.load_model(str(files["root"] / "flux-Q8_0.gguf"), on_status=notes.append)
    assert any("already GGUF-quantized" in note and "quantize=fp8" in note for note in notes)
    weight = engine.model.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter"  # not cast to float8 on top


def test_training_on_a_gguf_base_is_refused_naming_the_model(files):
    from lorapg.diffusion.pipeline_loader import load_pipeline

    source = resolve_model_source(str(files["root"] / "flux-Q8_0.gguf"))
    # What the trainer calls (lorapg.training.trainer._load_models) before a step runs.
    with pytest.raises(UserError, match="Setting model: flux-Q8_0.gguf is a GGUF-quantized transformer") as caught:
        load_pipeline(source, torch.device("cpu"), torch.float32, single_file_config=str(files["flux"]), training=True)
    assert "\n" not in str(caught.value)


def test_sd3_gguf_loads_with_the_same_call(files):
    folder = make_engine(files)
    folder.load_model(str(files["sd3"]))
    single = make_engine(files, str(files["sd3"]))
    single.load_model(str(files["root"] / "sd3-Q8_0.gguf"))
    assert single.model.family == SD3 and is_quantized(single.model.pipe.transformer)
    assert np.abs(pixels(single) - pixels(folder)).max() <= MAX_LEVELS


def test_bfl_names_are_detected_as_flux_dev_from_the_header(tmp_path, monkeypatch):
    # The names of city96's files (BFL's), with the guidance input only FLUX.1 dev has.
    names = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "guidance_in.in_layer.weight"]
    path = write_gguf(tmp_path / "flux1-dev-Q4_K_S.gguf", {name: torch.ones(64, 32) for name in names})
    assert resolve_model_source(str(path)).family == FLUX
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="FLUX.1-dev"):  # the reference repo it would take the parts from
        make_engine({"loras": tmp_path}).load_model(str(path))


def test_offline_without_model_config_says_what_the_safetensors_file_says(files, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    messages = []
    for name in ("flux-Q8_0.gguf", "flux-transformer.safetensors"):
        with pytest.raises(UserError, match="--model-config") as caught:
            make_engine(files).load_model(str(files["root"] / name))
        messages.append(str(caught.value).replace(name, "FILE"))
    assert messages[0] == messages[1] and "\n" not in messages[0]


def test_a_language_model_gguf_is_refused_saying_what_it_is(tmp_path):
    state = {"token_embd.weight": torch.ones(8, 32), "blk.0.attn_q.weight": torch.ones(32, 32)}
    path = write_gguf(tmp_path / "smollm2-135m-q8_0.gguf", state, arch="llama")
    with pytest.raises(UserError, match=r"model: .*language model \(llama\)") as caught:
        resolve_model_source(str(path))
    assert "Flux.1" in str(caught.value) and "\n" not in str(caught.value)


def test_a_garbage_gguf_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="model: broken.gguf is not a readable GGUF file") as caught:
        resolve_model_source(str(path))
    assert "\n" not in str(caught.value)


def test_without_the_gguf_package_the_message_says_how_to_install_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an uninstalled package looks like to import
    with pytest.raises(UserError, match="pip install 'gguf>=0.10'"):
        resolve_model_source(str(files["root"] / "flux-Q8_0.gguf"))


def test_cli_generates_from_a_gguf_with_model_config(files, tmp_path):
    from PIL import Image

    from lorapg.cli import main

    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            *("--model", str(files["root"] / "flux-Q8_0.gguf"), "--model-config", str(files["flux"])),
            *("--lora-dir", str(files["loras"]), "--outputs", str(tmp_path / "outputs")),
            *("--models-dir", str(tmp_path / "models"), "--device", "cpu", "--threads", "1"),
            *("--prompt", "a red fox <lora:flux_style:0.8>", "--steps", "2", "--seed", "5", "--sampler", "Euler"),
            *("--out", str(out), "--no-gallery"),
        ]
    )
    assert code == 0
    image = Image.open(out)
    assert image.size == (32, 32) and "<lora:flux_style:0.8>" in image.text["parameters"]


def crafted_gguf(path, key: bytes, value_type: int, payload: bytes, tensor_count: int = 0):
    """A GGUF v3 header with one metadata entry and nothing after it: what a crafted upload looks like."""
    import struct

    header = b"GGUF" + struct.pack("<IQQ", 3, tensor_count, 1) + struct.pack("<Q", len(key)) + key
    path.write_bytes(header + struct.pack("<I", value_type) + payload)
    return path


# A child process with a memory cap runs the check: a regression (gguf's GGUFReader looping once per claimed
# array element, ~80 MB/s) then fails this test within the timeout instead of hanging or swapping the suite.
_CHECK_IN_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from lorapg.diffusion.model_source import resolve_model_source
from lorapg.errors import UserError
try:
    resolve_model_source(sys.argv[1])
except UserError as exc:
    print("REFUSED", exc)
"""


def test_a_gguf_whose_array_runs_past_the_end_is_refused_at_once(tmp_path):
    import struct
    import subprocess

    uint8, array = 0, 9
    # 49 bytes: one uint8 array claiming 2**40 items.
    path = crafted_gguf(tmp_path / "crafted.gguf", b"x", array, struct.pack("<IQ", uint8, 1 << 40))
    assert path.stat().st_size == 49
    done = subprocess.run(
        [sys.executable, "-c", _CHECK_IN_CHILD, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("REFUSED Setting model: crafted.gguf is not a readable GGUF file")
    assert done.stdout.count("\n") == 1


@pytest.mark.parametrize(
    "value_type, payload, tensors, says",
    [
        (8, b"\xff" * 8, 0, "bytes where"),  # a string 2**64-1 bytes long
        (9, (8).to_bytes(4, "little") + (1 << 30).to_bytes(8, "little"), 0, "over 1048576 items"),  # 2**30 strings
        (9, (9).to_bytes(4, "little") + (3).to_bytes(8, "little"), 0, "3 array items"),  # arrays not there
        (4, (32).to_bytes(4, "little"), 1 << 40, "2**40"),  # 2**40 tensors
    ],
)
def test_gguf_header_counts_beyond_the_file_are_refused(tmp_path, value_type, payload, tensors, says):
    path = crafted_gguf(tmp_path / "bad.gguf", b"k", value_type, payload, tensor_count=tensors)
    says = says.replace("2**40", str(1 << 40))
    with pytest.raises(UserError, match="Setting model: bad.gguf is not a readable GGUF file") as caught:
        resolve_model_source(str(path))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_gguf_download_is_refused_before_loading(files, tmp_path):
    whole = (files["root"] / "flux-Q8_0.gguf").read_bytes()
    path = tmp_path / "flux-Q8_0.gguf"
    path.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(UserError, match=r"not a readable GGUF file \(tensor .* past the end \(truncated download"):
        resolve_model_source(str(path))


@pytest.mark.parametrize("quant", ["IQ2_XS", "TQ1_0"])
def test_a_quantization_diffusers_cannot_dequantize_is_refused_naming_it(tmp_path, quant):
    kind = gguf.GGMLQuantizationType[quant]
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(tmp_path / f"flux1-dev-{quant}.gguf"), arch="flux")
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((4, block_bytes), np.uint8), raw_dtype=kind)
    writer.add_tensor("single_blocks.0.linear1.weight", np.ones((4, block), np.float16))  # F16: loadable
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    with pytest.raises(UserError, match=f"model: flux1-dev-{quant}.gguf holds tensors quantized as {quant},") as caught:
        resolve_model_source(str(tmp_path / f"flux1-dev-{quant}.gguf"))
    message = str(caught.value)
    assert "Q8_0" in message and "Q4_K" in message and "F16" in message and "--model-config" not in message
    assert "\n" not in message


def test_an_upper_case_gguf_suffix_loads_as_the_lower_case_one(files, tmp_path, gguf_engine):
    # diffusers chooses its GGUF reader by a case-sensitive suffix; .GGUF went to torch.load and an OSError.
    path = tmp_path / "FLUX-Q8_0.GGUF"
    path.write_bytes((files["root"] / "flux-Q8_0.gguf").read_bytes())
    engine = make_engine(files, str(files["flux"]))
    engine.load_model(str(path))
    weight = engine.model.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.quant_type == Q8_0
    assert np.array_equal(pixels(engine), pixels(gguf_engine))  # the same file, the same computation


def test_gguf_transformers_in_the_models_folder_are_offered_and_hashed(files, tmp_path):
    import hashlib
    import shutil

    from lorapg.config import load_settings
    from lorapg.services.a1111 import A1111Service
    from lorapg.services.build import build_services

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "llm").mkdir()
    top, nested = models / "flux-Q8_0.gguf", models / "checkpoints" / "FLUX1-DEV-Q8_0.GGUF"
    for path in (top, nested):
        shutil.copyfile(files["root"] / "flux-Q8_0.gguf", path)
    llm = write_gguf(models / "llm" / "smollm2.gguf", {"token_embd.weight": torch.ones(8, 32)}, arch="llama")
    settings = load_settings(
        None,
        {"model": "org/model", "models_dir": str(models), "lora_dir": str(models / "loras"), "outputs": str(tmp_path)},
        environ={},
    )
    runtime = build_services(settings)
    try:
        service = runtime.service
        choices = service.model_choices()
        assert str(top) in choices and str(nested) in choices and str(llm) not in choices
        service.offered_models_only = True  # a public Space: only what the list offers loads
        assert service.check_model_ref(str(nested)) == str(nested)
        with pytest.raises(UserError, match="offers only the models in its list"):
            service.check_model_ref(str(llm))
        entries = {entry.ref: entry for entry in A1111Service(settings, service, runtime.gallery_service).sd_models()}
        sha256 = hashlib.sha256(top.read_bytes()).hexdigest()
        assert entries[str(top)].sha256 == sha256 and entries[str(top)].title == f"flux-Q8_0.gguf [{sha256[:10]}]"
        assert entries[str(top)].model_name == "flux-Q8_0"
    finally:
        runtime.close(30)


@pytest.mark.parametrize("field", ["model", "empty"])
def test_training_on_a_gguf_is_refused_before_queueing(files, tmp_path, field):
    from lorapg.config import Settings
    from lorapg.jobs import JobQueue
    from lorapg.services.training import TrainingService
    from tests.training_data import write_images

    model = str(files["root"] / "flux-Q8_0.gguf")
    settings = Settings(model=model, lora_dir=tmp_path / "loras", models_dir=tmp_path / "models", device="cpu")
    jobs = JobQueue()
    try:
        training = TrainingService(settings, jobs, make_engine(files, str(files["flux"])))
        write_images(tmp_path / "images", 2)
        values = {"name": "fox", "trigger": "zqx", "images": str(tmp_path / "images")}
        values |= {"model": model} if field == "model" else {}
        named = "model" if field == "model" else r"model \(the loaded model when empty\)"
        with pytest.raises(UserError, match=f"^Setting {named}: flux-Q8_0.gguf is a GGUF-quantized transformer"):
            training.submit(training.config_for(values))
        assert training.latest_run() is None
    finally:
        jobs.shutdown()


@pytest.mark.parametrize("bf16", [True, False])
def test_dtype_auto_takes_bf16_for_flux_and_sd3_on_gpus_that_have_it(monkeypatch, bf16):
    from lorapg.config import Settings
    from lorapg.devices import pick_dtype
    from lorapg.diffusion.families import SD1, SD2, SDXL
    from lorapg.services.build import _transformer_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    cuda, half = torch.device("cuda"), torch.bfloat16 if bf16 else torch.float16
    assert [pick_dtype(cuda, "auto", family) for family in (FLUX, SD3)] == [half, half]
    assert {pick_dtype(cuda, "auto", family) for family in (SD1, SD2, SDXL, None)} == {torch.float16}
    assert pick_dtype(cuda, "float16", FLUX) == torch.float16  # what the user asks for stays
    assert pick_dtype(torch.device("cpu"), "auto", FLUX) == torch.float32
    assert _transformer_dtype(Settings(), cuda) == half  # what the app's engines are built with


def test_the_transformer_dtype_applies_to_flux_folders_and_gguf_files_only(files, tiny_models):
    engine = make_engine(files, str(files["flux"]), transformer_dtype=torch.bfloat16)
    engine.load_model(str(files["root"] / "flux-Q8_0.gguf"))  # the GGUF's compute dtype and its F16 tensors
    transformer = engine.model.pipe.transformer
    assert transformer.x_embedder.weight.dtype == torch.bfloat16
    assert transformer.transformer_blocks[0].attn.to_q.compute_dtype == torch.bfloat16
    engine.load_model(str(files["sd3"]))
    assert engine.model.pipe.transformer.dtype == torch.bfloat16 and engine.model.pipe.vae.dtype == torch.bfloat16
    engine.load_model(str(tiny_models["sd15"]))
    assert engine.model.pipe.unet.dtype == torch.float32  # SD keeps the engine's dtype
