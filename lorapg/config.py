"""Settings: defaults, then a TOML file, then ``LORAPG_*`` environment variables, then CLI flags.

Strict on purpose: an unknown key in the TOML file or a value of the wrong type is an error that
names the key, instead of a typo silently falling back to a default (a lesson from configs that
read everything through ``kwargs.get``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorapg.coercion import coerce_setting
from lorapg.coercion import read_toml as read_toml_file
from lorapg.errors import UserError

# The bundled demo model (models/demo, 5 MB): with no model configured the app runs offline on any
# CPU. Real work uses SD 1.5 / SDXL (see SUGGESTED_MODELS).
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"
DEFAULT_MODEL = str(DEMO_MODEL)
SUGGESTED_MODELS = {
    "SD 1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "SDXL": "stabilityai/stable-diffusion-xl-base-1.0",
}
ENV_PREFIX = "LORAPG_"


@dataclass
class Settings:
    model: str = DEFAULT_MODEL  # hub id, diffusers folder or .safetensors file; default: the bundled demo
    lora_dir: Path = Path("models/loras")
    models_dir: Path = Path("models")
    outputs: Path = Path("outputs")
    listen: bool = False  # serve on 0.0.0.0 instead of 127.0.0.1
    port: int = 7860
    share: bool = False
    auth: str | None = None  # "user:pass"
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    allow_pickle: bool = False
    single_file_config: str | None = None  # diffusers folder with configs for single-file checkpoints
    preview_every: int = 5
    gallery_keep: int = 20  # newest images kept in the gallery; 0 keeps all; starred never pruned
    load_model_at_start: bool = True  # load the base model in the background once the UI is up
    # Prompt tools' LLM: auto | transformers | bundled | openai | rules (see lorapg/services/prompts.py).
    llm_backend: str = "auto"
    llm_model: str | None = None  # hub id / folder / .gguf (transformers) or served model name (openai)
    llm_url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1
    llm_api_key: str | None = None
    llm_timeout: float = 60.0  # seconds an LLM may write before the rules answer instead
    # GPU residency: "auto" = free GPU memory at start minus a reserve, or a size such as "10GB".
    vram_budget: str = "auto"
    policy: str = "auto"  # auto | lowvram | all-gpu (see lorapg/residency.py)
    # Public hosting (a Hugging Face Space; see lorapg/hosting/space_policy.py). "auto"/-1 = decided by where it runs.
    visitors: str = "auto"  # auto | private | shared: private keeps each visitor's gallery, drafts, datasets apart
    shared_gallery: bool = False  # with private visitors: everyone sees every image (and edits only their own)
    max_upload_mb: int = -1  # largest upload; -1 = auto (50 on a Space, no limit locally), 0 = no limit
    train_max_steps: int = -1  # longest training run; -1 = auto (a Space: 600 on CPU and on ZeroGPU; else none)
    # Input limits (issue 13): each refusal names the limit and the setting that raises it. They keep one
    # request from holding gigabytes of memory or disk, or the GPU queue, for everybody else.
    max_prompt_chars: int = 8000  # prompt / negative prompt / prompt-tool input; A1111 prompts rarely pass 2000
    max_image_pixels: int = 50_000_000  # any image read from a user (upload, dataset, PNG Info): ~7000x7000
    max_unpacked_mb: int = 2048  # all members of one uploaded zip, unpacked, checked before anything is written
    max_dataset_images: int = 200  # images in one training dataset, checked before anything is written
    # Added last (issue 13): the address to serve on from Gradio's GRADIO_SERVER_NAME; "" = loopback.
    # --listen / LORAPG_LISTEN rank above it (see load_settings).
    server_name: str = ""
    # Added last (issue 15): the REST API (A1111's /sdapi/v1), and HTTP Basic "user:pass[,user2:pass2]" for it.
    api: bool = False
    api_auth: str | None = None
    # Added last (issue 18): cells in one comparison grid (all Z values); the API refuses more with the count.
    max_grid_cells: int = 64
    # Added last (issue 16): torch.compile the UNet (--compile); LoRAs are then weight patches, never recompiling.
    compile_unet: bool = False
    # Added last (issue 19): JSON POST here when a training run ends (lorapg/notifications.py); "" = none.
    notify_webhook: str = ""
    # Added last (issue 20): one generation worker per device ("cuda:0,cuda:1"; "cpu,cpu" in tests), all
    # behind the one job queue; None = one worker on `device`, as before. Training runs on train_device
    # (one of them; None = the first) and holds only that worker.
    devices: str | None = None
    train_device: str | None = None
    # Added last (issue 18): input pixels per tile side when an upscaler model runs (lorapg/diffusion/upscalers.py);
    # smaller tiles need less memory. 0 = the whole image in one piece.
    upscale_tile: int = 256
    # Added last (issue 17): how Flux.1 / SD 3.5's transformer and T5 encoder are stored: none | fp8 | nf4
    # (lorapg/diffusion/quantization.py); quantize_components overrides per component ("transformer=nf4,t5=fp8").
    quantize: str = "none"
    quantize_components: str = ""
    # Issue 20: the Ray cluster whose lorapg workers (``python -m lorapg worker --connect``) join this app's
    # job queue as generation workers beside its own device(s); None = no remote workers, no Ray import.
    ray: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def gallery_db(self) -> Path:
        return self.outputs / "gallery.sqlite3"

    @property
    def gallery_images(self) -> Path:
        return self.outputs / "images"

    @property
    def host(self) -> str:
        if self.listen:
            return "0.0.0.0"
        return self.server_name or "127.0.0.1"

    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth must look like user:password.")
        return user, password

    @property
    def reachable_from_network(self) -> bool:
        """Whether the address served on accepts other machines (``--listen``, a non-loopback
        ``GRADIO_SERVER_NAME``): anything but a loopback address or ``localhost``."""
        return not is_loopback(self.host)

    def ensure_share_auth(self, on_spaces: bool = False) -> str | None:
        """Nothing is exposed to a network without a password: a share link, ``--listen`` or a
        ``GRADIO_SERVER_NAME`` other than the loopback, without ``--auth``, get a generated one.

        On a Hugging Face Space the platform decides who reaches the app (its proxy needs 0.0.0.0),
        so there only a share link counts, as before. Returns the generated password when one had to
        be made (the caller shows it once).
        """
        exposed = self.share or (self.reachable_from_network and not on_spaces)
        if not exposed or self.auth:
            return None
        password = secrets.token_urlsafe(12)
        self.auth = f"lorapg:{password}"
        return password


_FIELD_TYPES = {f.name: f for f in fields(Settings) if f.name != "extra"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it resolves to an address others can reach
        return False


def is_demo_model(ref: str | None) -> bool:
    """True when ``ref`` names the bundled demo folder (however the path is spelled)."""
    if not ref:
        return False
    try:
        return Path(ref).expanduser().resolve() == DEMO_MODEL
    except (OSError, RuntimeError):
        return False


def _coerce(name: str, value: Any) -> Any:
    # One coercion for settings and training configs (lorapg.coercion): 7860.9 is refused, not truncated.
    return coerce_setting(f"Setting {name!r}", _FIELD_TYPES[name].type, value)


# Gradio's own conventions (Spaces, containers, people used to Gradio apps), ranked above the TOML file
# and below LORAPG_* variables and flags.
GRADIO_ENV = {"port": "GRADIO_SERVER_PORT", "server_name": "GRADIO_SERVER_NAME"}


def _gradio_server_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {name: env[key] for name, key in GRADIO_ENV.items() if env.get(key, "").strip()}
    if "server_name" in values:
        values["server_name"] = values["server_name"].strip()
        values["listen"] = False  # the name decides the address, over the TOML file's `listen`
    return values


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_toml(config_file))
    env = os.environ if environ is None else environ
    values.update(_gradio_server_env(env))
    for name in _FIELD_TYPES:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    listen_given = ENV_PREFIX + "LISTEN" in env or (overrides or {}).get("listen") is not None
    if listen_given and GRADIO_ENV["server_name"] in env:
        values.pop("server_name", None)  # --listen / LORAPG_LISTEN decide the address, whichever way
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise UserError(f"Unknown setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(_FIELD_TYPES))}.")
    return dataclasses.replace(Settings(), **{name: _coerce(name, value) for name, value in values.items()})


def read_toml(path: Path) -> dict[str, Any]:
    data = read_toml_file(path, "Config file")
    # Accept both a flat file and one with the settings under [lorapg].
    return dict(data.get("lorapg", data))
