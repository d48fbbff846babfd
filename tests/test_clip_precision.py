"""clip.precision: the low-precision and amp modes encode (issue 21), close to fp32."""
from __future__ import annotations

import pytest
import torch

from reco.clip import encode_images, encode_texts, input_dtype, load_clip

TEXTS = ["a photo of a red bird", "a photo of a small fish", "a blue flower"]


def _clip(precision: str):
    torch.manual_seed(0)            # random init: the same weights for every precision
    return load_clip("reco-tiny", precision=precision)


@pytest.fixture(scope="module")
def reference():
    clip = _clip("fp32")
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, clip.image_size, clip.image_size)
    return pixels, encode_images(clip, pixels), encode_texts(clip, TEXTS)


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16", "amp_bf16", "amp"])
def test_low_precision_encodes_like_fp32(reference, precision):
    pixels, img32, txt32 = reference
    clip = _clip(precision)
    img, txt = encode_images(clip, pixels), encode_texts(clip, TEXTS)
    for emb, ref in ((img, img32), (txt, txt32)):
        assert emb.dtype == torch.float32 and emb.shape == ref.shape
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-4)
        assert (emb * ref).sum(-1).min() > 0.98           # cosine to the fp32 embedding


def test_input_dtype_follows_precision():
    assert input_dtype(_clip("bf16")) == torch.bfloat16
    assert input_dtype(_clip("amp_bf16")) == torch.float32
    assert input_dtype(_clip("fp32")) == torch.float32
