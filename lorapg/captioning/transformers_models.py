"""BLIP, BLIP-2 and Florence-2 through transformers' own classes (never a repo's remote code).

Both load lazily (``ensure_loaded``) on the device they were built for and ``release`` drops them,
as the prompt tools' LLM does, so the residency manager can free the GPU for training.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lorapg.captioning import memory
from lorapg.captioning.base import CaptionOptions, RawCaption
from lorapg.captioning.sources import BLIP, BLIP2, FLORENCE2
from lorapg.errors import UserError

log = logging.getLogger(__name__)

FLORENCE_TASK = "<DETAILED_CAPTION>"  # a sentence or two; <CAPTION> is one short line


class TransformersCaptioner:
    """Shared lifecycle: load once under a lock, drop on ``release``, size from the weights on disk."""

    kind = ""

    def __init__(self, folder: Path, label: str, device: str = "cpu", *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.label = label
        self.device = device
        # .bin weights are pickles that can run code when loaded: only with --allow-pickle.
        self.allow_pickle = allow_pickle
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def ensure_loaded(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            started = time.perf_counter()
            self._check_weights()
            self._check_memory()
            try:
                model, processor = self._load()
            except (OSError, ValueError, KeyError) as exc:
                first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
                raise UserError(
                    f"Could not load the {self.kind} captioner from {self.label}: {first}. "
                    "Check that the folder is a complete save_pretrained folder, or pick another captioner."
                ) from None
            model.to(self.device).eval()
            self._model, self._processor = model, processor
            log.info("loaded %s captioner %s in %.1f s", self.kind, self.label, time.perf_counter() - started)

    def _check_weights(self) -> None:
        """Refuse a folder whose only weights are pickles, before transformers opens anything."""
        if self.allow_pickle or any(self.folder.glob("*.safetensors")):
            return
        raise UserError(
            f"The {self.kind} captioner in {self.label} has no .safetensors weights; pickled weights (.bin) can run "
            "arbitrary code. Save the model with safetensors, or pass --allow-pickle if you trust its source."
        )

    def _check_memory(self) -> None:
        """Refuse, before loading, a model that does not fit (BLIP-2); the small ones always do."""

    def _weights_options(self) -> dict[str, Any]:
        """from_pretrained's options: safetensors only unless pickles are allowed."""
        return {"local_files_only": True} if self.allow_pickle else {"local_files_only": True, "use_safetensors": True}

    def release(self) -> None:
        with self._lock:
            if self._model is None:
                return
            self._model = self._processor = None
            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            log.info("released %s captioner %s", self.kind, self.label)

    def estimated_bytes(self) -> int:
        """The weights' size on disk (fp32 on CPU, as loaded), plus a quarter for activations."""
        weights = sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))
        return int(weights * 1.25) or 1

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[RawCaption]:
        import torch

        self.ensure_loaded()
        # Sub-word tokens per word: about 1.5 in English; a margin so the cut happens at a word.
        max_new_tokens = max(8, options.max_length * 2)
        with torch.inference_mode():
            texts = self._generate(list(images), max_new_tokens)
        return [RawCaption(sentence=" ".join(text.split())) for text in texts]

    def _load(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _generate(self, images: list[Image.Image], max_new_tokens: int) -> list[str]:
        raise NotImplementedError


class BlipCaptioner(TransformersCaptioner):
    kind = BLIP

    def _load(self) -> tuple[Any, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = BlipProcessor.from_pretrained(str(self.folder), local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(str(self.folder), **self._weights_options())
        return model, processor

    def _generate(self, images: list[Image.Image], max_new_tokens: int) -> list[str]:
        inputs = self._processor(images=images, return_tensors="pt").to(self.device)
        output = self._model.generate(**inputs, max_new_tokens=max_new_tokens)
        return self._processor.batch_decode(output, skip_special_tokens=True)


class Florence2Captioner(TransformersCaptioner):
    kind = FLORENCE2

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        processor = AutoProcessor.from_pretrained(str(self.folder), local_files_only=True)
        model = Florence2ForConditionalGeneration.from_pretrained(str(self.folder), **self._weights_options())
        return model, processor

    def _generate(self, images: list[Image.Image], max_new_tokens: int) -> list[str]:
        inputs = self._processor(text=[FLORENCE_TASK] * len(images), images=images, return_tensors="pt")
        inputs = inputs.to(self.device)
        output = self._model.generate(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"].to(self._model.dtype),
            max_new_tokens=max_new_tokens,
            num_beams=3,
        )
        return self._processor.batch_decode(output, skip_special_tokens=True)


class Blip2Captioner(TransformersCaptioner):
    """BLIP-2 (OPT language model): fp16 on a GPU, fp32 on CPU; loaded only where the estimate fits."""

    kind = BLIP2

    @property
    def _element_bytes(self) -> int:
        return 2 if self.device.startswith("cuda") else 4

    def _params(self) -> int:
        """The parameters of the weights from_pretrained will read, not every weight file in the folder."""
        return memory.weights_params(self.folder)

    def estimated_bytes(self) -> int:
        return int(self._params() * self._element_bytes * memory.ACTIVATION_MARGIN) or 1

    def _check_memory(self) -> None:
        # Called under the residency manager on a GPU: models it evicted for this one are gone by now.
        memory.check_fits(f"{BLIP2} ({self.label})", self._params(), self._element_bytes, self.device)

    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        dtype = torch.float16 if self._element_bytes == 2 else torch.float32
        processor = Blip2Processor.from_pretrained(str(self.folder), local_files_only=True)
        model = Blip2ForConditionalGeneration.from_pretrained(str(self.folder), dtype=dtype, **self._weights_options())
        return model, processor

    def _generate(self, images: list[Image.Image], max_new_tokens: int) -> list[str]:
        # No prompt: the model starts from its query tokens and BOS, the plain "describe the image" mode.
        inputs = self._processor(images=images, return_tensors="pt").to(self.device)
        # BLIP-2's generate hands over to its language model, whose own default generation config would
        # silently replace the folder's generation_config.json: pass the folder's, with our length.
        config = copy.deepcopy(self._model.generation_config)
        config.max_new_tokens = max_new_tokens
        output = self._model.generate(
            pixel_values=inputs["pixel_values"].to(self._model.dtype), generation_config=config
        )
        return self._processor.batch_decode(output, skip_special_tokens=True)
