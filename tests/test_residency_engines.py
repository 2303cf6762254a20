"""The residency manager with the real tiny diffusion engine under a tight budget (CPU as "device")."""

from __future__ import annotations

import shutil

import torch

from lorapg.diffusion.engine import RESIDENT_NAME, DiffusionEngine, pipeline_bytes
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.diffusion.request import GenerationRequest, LoraRequest
from lorapg.residency import CPU, GPU, ResidencyManager


def test_the_pipeline_runs_only_while_resident_and_makes_room_for_others(tiny_models):
    manager = ResidencyManager(budget_bytes=10**9)
    engine = DiffusionEngine(LoraLibrary(tiny_models["loras"]), torch.device("cpu"), torch.float32, residency=manager)
    engine.load_model(str(tiny_models["sd15"]))
    size = pipeline_bytes(engine.model.pipe)
    assert 0 < size < 10**7
    manager.budget_bytes = int(size * 1.5)  # room for the pipeline or the "LLM", never both

    def location() -> str:
        return manager._models[RESIDENT_NAME].location

    ran_while = []
    for module in (engine.model.pipe.unet, engine.model.pipe.text_encoder, engine.model.pipe.vae):
        module.register_forward_pre_hook(lambda *args: ran_while.append(location()))
    llm_moves = []
    manager.register("llm", size, to_gpu=lambda: llm_moves.append(GPU), to_cpu=lambda: llm_moves.append(CPU))

    assert location() == CPU  # loaded into RAM; placed on first use
    engine.generate(GenerationRequest(prompt="a fox", steps=2, seed=1, loras=(LoraRequest("style", 0.5),)))
    with manager.use("llm"):  # the prompt LLM needs the room: the pipeline leaves
        assert location() == CPU
    engine.generate(GenerationRequest(prompt="a fox", steps=2, seed=1))
    assert llm_moves == [GPU, CPU]
    assert ran_while and set(ran_while) == {GPU}
    assert manager.bytes_moved_to_gpu == 3 * size  # pipeline, LLM, pipeline again


def test_generate_enhance_train_generate_under_a_tight_budget(tiny_models, tmp_path):
    """All three engines through one manager: each model is on the "device" whenever it computes,
    training holds the device alone, and the pipeline comes back afterwards."""
    from lorapg.config import Settings
    from lorapg.jobs import JobQueue
    from lorapg.prompting.backends import TransformersBackend
    from lorapg.services.generation import GenerationService
    from lorapg.services.prompts import LLM_RESIDENT_NAME, PromptService
    from lorapg.services.training import TrainingService
    from tests.test_prompting_backends import build_tiny_chat_model
    from tests.training_data import write_images

    llm_dir = build_tiny_chat_model(tmp_path / "llm")
    loras = tmp_path / "loras"  # training writes into it: keep the shared fixture folder untouched
    shutil.copytree(tiny_models["loras"], loras)
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=loras,
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
        llm_backend="transformers",
        llm_model=str(llm_dir),
        llm_timeout=120.0,
    )
    manager = ResidencyManager(budget_bytes=10**9)
    jobs = JobQueue()
    engine = DiffusionEngine(LoraLibrary(settings.lora_dir), torch.device("cpu"), torch.float32, residency=manager)
    playground = GenerationService(settings, engine, engine.library, jobs)
    prompts = PromptService(settings, engine.library, jobs, engine=engine)
    training = TrainingService(settings, jobs, engine)
    playground.load_model()

    def where(name: str) -> str | None:
        model = manager._models.get(name)
        return model.location if model else None

    seen: list[tuple[str, str | None]] = []
    pipe = engine.model.pipe
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.register_forward_pre_hook(lambda *args: seen.append(("pipeline", where(RESIDENT_NAME))))
    backend = prompts.backend
    assert isinstance(backend, TransformersBackend)
    original_load = backend.ensure_loaded

    def load_and_watch():
        first = not backend.loaded
        original_load()
        if first:
            backend._model.register_forward_pre_hook(lambda *args: seen.append(("llm", where(LLM_RESIDENT_NAME))))

    backend.ensure_loaded = load_and_watch
    # Room for the pipeline or the LLM, never both: every switch must evict.
    llm_bytes = sum(p.numel() * p.element_size() for p in TransformersBackend(str(llm_dir)).model.parameters())
    manager.budget_bytes = int(max(pipeline_bytes(pipe), llm_bytes) * 1.3)

    playground.generate(GenerationRequest(prompt="a fox", steps=2, seed=1))
    result = prompts.enhance("fox, forest", lora_names=["triggered"], seed=3)
    assert "zqstyle" in result.text
    assert where(RESIDENT_NAME) == CPU  # the LLM needed the room

    during_training = []
    write_images(tmp_path / "upload", 3)
    training.dataset_add("foxes", sorted((tmp_path / "upload").iterdir()))
    config = training.config_for(
        {
            "preset": "concept",
            "name": "fox_lora",
            "trigger": "zqx_fox",
            "images": str(training.dataset_folder("foxes")),
            "rank": 4,
            "alpha": 4,
            "epochs": 1,
            "sample_steps": 1,
            "gradient_checkpointing": False,
            "batch_size": 2,
        }
    )
    training.train(
        config,
        on_progress=lambda update: during_training.append(
            (manager._exclusive, where(RESIDENT_NAME), where(LLM_RESIDENT_NAME))
        ),
    )
    assert during_training and all(
        holder == "LoRA training" and pipe_at != GPU and llm_at != GPU for holder, pipe_at, llm_at in during_training
    )

    playground.generate(GenerationRequest(prompt="a fox", steps=2, seed=1))
    assert where(RESIDENT_NAME) == GPU
    kinds = {kind for kind, _ in seen}
    assert kinds == {"pipeline", "llm"}
    assert all(location == GPU for _, location in seen), seen
    jobs.shutdown()
