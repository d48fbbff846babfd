"""The embed stage's encoder device: from the run's clip section, per worker, checked."""
from __future__ import annotations

import pytest
import torch

from reco.clip import resolve_device
from reco.config import override, preset
from reco.errors import ConfigError
from reco.pipelines.embed_memory import run_embed_config


def test_auto_picks_the_visible_device():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match="clip.device=cuda: no CUDA device"):
        resolve_device("cuda")


def test_embed_device_defaults_to_the_runs_clip_device():
    cfg = override(preset("tiny"), ["clip.device=auto", "clip.precision=fp16"])
    e = run_embed_config(cfg)
    assert (e.device, e.precision) == ("auto", "fp16")
    own = run_embed_config(override(cfg, ["embed.device=cpu"]))
    assert own.device == "cpu"                       # the stage's own option wins


def test_encoders_return_cpu_float32(tmp_path):
    from reco.clip import encode_images, encode_texts, load_clip

    torch.manual_seed(0)
    clip = load_clip("reco-tiny", device=resolve_device("auto"))
    img = encode_images(clip, torch.zeros(2, 3, clip.image_size, clip.image_size))
    txt = encode_texts(clip, ["a photo of a bird", ""])
    for x in (img, txt):
        assert x.device.type == "cpu" and x.dtype == torch.float32
        assert torch.allclose(x.norm(dim=-1), torch.ones(2), atol=1e-5)
