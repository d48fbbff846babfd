"""open_clip models: the project's own configs beside open_clip's, one loading function.

A model is named the open_clip way: a built-in name with a pretrained tag or checkpoint file
(``ViT-B-32`` + ``openai``), a project config (``reco-tiny``, random init unless ``pretrained``
is a file), or ``local-dir:/path`` holding ``open_clip_config.json`` and
``open_clip_model.safetensors`` (how reco saves the base CLIP it trains on the generated world).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from reco.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
LOCAL_DIR = "local-dir:"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
_registered = False


def register_project_configs() -> None:
    """Add reco's JSON model configs (``reco/model_configs``) to open_clip's registry."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_models() -> list[str]:
    import open_clip

    register_project_configs()
    return open_clip.list_models()


@dataclass
class LoadedClip:
    model: torch.nn.Module
    preprocess: Callable          # PIL image -> tensor (eval transform)
    tokenizer: Callable           # list[str] -> LongTensor
    name: str                     # model spec as given
    pretrained: str               # tag/path, or "" for none
    embed_dim: int
    image_size: int
    identity: str = ""            # model_identity(name, pretrained): what the model IS
    precision: str = "fp32"       # open_clip precision the model was created with

    @property
    def model_id(self) -> str:
        """What manifests and records hold, so that artefacts of different models are never
        mixed: :func:`model_identity` (never the path the model was reached by)."""
        return self.identity or model_identity(self.name, self.pretrained or None)

    def spec(self, relative_to: str | Path | None = None) -> dict[str, str | None]:
        """How to load this model again: ``{"model", "pretrained"}``; a ``local-dir:`` folder
        (or a checkpoint file) relative to ``relative_to`` when given (a run's folder), so that
        the spec survives moving or copying the run."""
        return relative_spec(self.name, self.pretrained or None, relative_to)


def relative_spec(model: str, pretrained: str | None, relative_to: str | Path | None = None
                  ) -> dict[str, str | None]:
    """``{"model", "pretrained"}`` with a ``local-dir:`` folder or checkpoint file relative to
    ``relative_to`` (when given): see :meth:`LoadedClip.spec` and :func:`spec_from`."""
    if relative_to is not None and model.startswith(LOCAL_DIR):
        model = LOCAL_DIR + os.path.relpath(Path(model[len(LOCAL_DIR):]).resolve(),
                                            Path(relative_to).resolve())
    if relative_to is not None and pretrained and Path(pretrained).is_file():
        pretrained = os.path.relpath(Path(pretrained).resolve(), Path(relative_to).resolve())
    return {"model": model, "pretrained": pretrained}


def spec_from(spec: dict[str, Any], relative_to: str | Path) -> tuple[str, str | None]:
    """(model, pretrained) of a :meth:`LoadedClip.spec` recorded relative to ``relative_to``."""
    model, pretrained = str(spec.get("model") or ""), spec.get("pretrained") or None
    base = Path(relative_to)
    if model.startswith(LOCAL_DIR) and not Path(model[len(LOCAL_DIR):]).is_absolute():
        model = LOCAL_DIR + os.path.normpath(base / model[len(LOCAL_DIR):])
    if pretrained and not Path(pretrained).is_absolute() and (base / pretrained).is_file():
        pretrained = os.path.normpath(base / pretrained)
    return model, pretrained


def _local_weights(folder: Path) -> Path | None:
    if (folder / WEIGHTS_FILE).is_file():
        return folder / WEIGHTS_FILE
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return found[0] if found else None


def model_identity(model: str, pretrained: str | None = None) -> str:
    """What a model IS, never the path used to reach it: ``name|tag`` for an open_clip name with a
    pretrained tag (``ViT-B-32|openai``) or none (``reco-tiny|``: random init); for weights in a
    local file or a ``local-dir:`` folder, the architecture and the sha256 of the weights
    (``reco-tiny|sha256:...``), so that a run reached by another path, moved or copied keeps its
    identity, and replaced weights change it."""
    from reco.record import file_digest

    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR):])
        arch = "local-dir"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            reco_meta = json.loads((folder / CONFIG_FILE).read_text()).get("reco") or {}
            arch = str(reco_meta.get("model") or (reco_meta.get("config") or {}).get("model") or arch)
        weights = _local_weights(folder) if folder.is_dir() else None
        return f"{arch}|{file_digest(weights) if weights else ''}"
    if pretrained and Path(pretrained).is_file():
        return f"{model}|{file_digest(pretrained)}"
    return f"{model}|{pretrained or ''}"


def load_clip(model: str, pretrained: str | None = None, device: str = "cpu",
              precision: str = "fp32") -> LoadedClip:
    """Create an open_clip model in eval mode with its eval preprocess and tokenizer.

    Args:
        model: open_clip model name, project config name, or ``local-dir:/path``.
        pretrained: open_clip pretrained tag or checkpoint path; ignored for ``local-dir:``.
        device: torch device string.
        precision: open_clip precision (``fp32``, ``fp16``, ``bf16``, ``amp``...).
    """
    import open_clip

    register_project_configs()
    _check_model_name(model)
    if model.startswith(LOCAL_DIR):
        pretrained = None
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device, precision=precision,
            pretrained_text=False, pretrained_image=False)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as exc:
        if not pretrained:
            raise
        # an unknown tag, a missing or unreadable checkpoint, weights that cannot download
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ConfigError(f"clip.pretrained={pretrained!r} (--pretrained) for model {model}: "
                          f"{first.split('. ')[0][:200]}") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    cfg = open_clip.get_model_config(model) or {}
    image_size = cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    return LoadedClip(clip, preprocess, tokenizer, model, pretrained or "",
                      int(cfg.get("embed_dim", 0)), int(image_size), model_identity(model, pretrained),
                      precision)


def _check_model_name(model: str) -> None:
    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR):])
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(f"--model {model}: no {CONFIG_FILE} in {folder}")
        return
    if model.startswith("hf-hub:"):
        return
    names = list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--model {model!r}: unknown open_clip model{hint}")


def save_local_dir(clip: torch.nn.Module, model_name: str, folder: str | Path,
                   extra: dict[str, Any] | None = None) -> str:
    """Save weights + config so that ``load_clip('local-dir:' + folder)`` restores the model.
    Returns the ``local-dir:`` spec. Files are written to temporary names and renamed."""
    import open_clip
    from safetensors.torch import save_file

    register_project_configs()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ConfigError(f"--model {model_name!r}: unknown open_clip model")
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    state = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / WEIGHTS_FILE)
    from reco.formats import atomic_write_text

    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg,
              "reco": {"model": model_name, **(extra or {})}}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2))
    return LOCAL_DIR + str(folder)


def resolve_model_spec(model: str, pretrained: str | None, base_clip_dir: str | Path) -> tuple[str, str | None]:
    """The model the pipeline should use: a project config with no weights given means the base
    CLIP trained on the generated world (``base_clip_dir``), if it has been trained."""
    register_project_configs()
    if pretrained is None and model.startswith("reco-") and (Path(base_clip_dir) / CONFIG_FILE).is_file():
        return LOCAL_DIR + str(base_clip_dir), None
    return model, pretrained


def resolve_device(device: str | None, option: str = "clip.device") -> str:
    """``auto`` (or None) -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given
    (``option``: the config option the device came from, named in the error)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}={device}: no CUDA device is visible on this machine")
    return str(device)


def _model_device(clip: LoadedClip) -> torch.device:
    return next(clip.model.parameters()).device


# amp precisions: (autocast dtype on CUDA, on CPU); CPU autocast runs bf16 (fp16 is slow there)
AMP_DTYPES = {"amp": (torch.float16, torch.bfloat16), "amp_bf16": (torch.bfloat16, torch.bfloat16),
              "amp_bfloat16": (torch.bfloat16, torch.bfloat16)}


def input_dtype(clip: LoadedClip) -> torch.dtype:
    """The dtype the model's first layer expects: bf16/fp16 for the low-precision modes
    (``fp16``, ``bf16``, ``pure_*``: open_clip casts the weights), float32 otherwise."""
    import open_clip

    return open_clip.get_input_dtype(clip.precision) or torch.float32


def autocast(clip: LoadedClip, device: torch.device):
    """``torch.autocast`` for the amp precisions, a no-op context otherwise."""
    dtypes = AMP_DTYPES.get(clip.precision)
    if dtypes is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[0] if device.type == "cuda" else dtypes[1])


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host -> device copy through pinned memory when the device is CUDA (asynchronous), then
    the cast (on the device, so the copy moves the smaller uint8/fp16 tensor when it can)."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


@torch.no_grad()
def encode_images(clip: LoadedClip, pixels: torch.Tensor) -> torch.Tensor:
    """Unit-norm float32 image embeddings on the CPU (pixels moved to the model's device through
    pinned memory on CUDA, cast to the model's input dtype, autocast for the amp precisions)."""
    device = _model_device(clip)
    pixels = to_device(pixels, device, input_dtype(clip))
    with autocast(clip, device):
        emb = clip.model.encode_image(pixels)
    return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()


def encode_texts(clip: LoadedClip, texts: list[str]) -> torch.Tensor:
    """Unit-norm float32 text embeddings on the CPU (tokenised, then :func:`encode_tokens`)."""
    return encode_tokens(clip, clip.tokenizer(list(texts)))


@torch.no_grad()
def encode_tokens(clip: LoadedClip, tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm float32 text embeddings of already tokenised texts on the CPU (tokens moved to
    the model's device, autocast for the amp precisions)."""
    device = _model_device(clip)
    tokens = to_device(tokens, device)
    with autocast(clip, device):
        emb = clip.model.encode_text(tokens)
    return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()
