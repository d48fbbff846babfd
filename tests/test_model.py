"""RecoModel: open_clip contract, modes, k at inference, memory swap (small in-test memory)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reco.errors import ConfigError, MismatchError
from reco.model import RecoModel
from reco.trainer.config import HeadConfig
from reco.trainer.heads import build_head


class ArrayMemory:
    """In-test memory with the interface of reco.index.memory.Memory (exact faiss search)."""

    def __init__(self, image_emb, text_emb, model_id, ids=None):
        import faiss

        self.image_emb = np.asarray(image_emb, np.float16)
        self.text_emb = np.asarray(text_emb, np.float16)
        self.ids = np.arange(len(image_emb), dtype=np.int64) if ids is None else np.asarray(ids)
        self.model_id = model_id
        self.dim = self.image_emb.shape[1]
        self.info = {"model_id": model_id, "dim": self.dim}
        self.calls = []
        self._index = {}
        for name, emb in (("img", self.image_emb), ("txt", self.text_emb)):
            index = faiss.IndexFlatIP(self.dim)
            index.add(emb.astype(np.float32))
            self._index[name] = index

    def search(self, queries, index, k):
        scores, pos = self._index[index].search(np.ascontiguousarray(queries, np.float32), k)
        return scores.astype(np.float32), pos.astype(np.int64)

    def embeddings(self, modality, positions):
        emb = (self.image_emb if modality == "img" else self.text_emb).astype(np.float32)
        out = emb[np.maximum(positions, 0)]
        out[positions < 0] = 0
        return out

    def context(self, queries, field, k):
        _, search, fuse = field.split("_")
        self.calls.append((field, k))
        return self.embeddings(fuse, self.search(queries, search, k)[1])


def perturbed_heads(dim, fusion="transformer", sides=("image", "text"), seed=0):
    torch.manual_seed(seed)
    heads = {}
    for side in sides:
        head = build_head(fusion, dim, HeadConfig(heads=4))
        with torch.no_grad():                      # zero-init output projections would make
            for p in head.parameters():            # the head an identity at step 0
                p.add_(0.05 * torch.randn_like(p))
        heads[side] = head.eval()
    return heads


def random_memory(clip, n=200, seed=0, model_id=None, dim=None):
    rng = np.random.default_rng(seed)
    d = dim or clip.embed_dim
    emb = rng.normal(size=(2, n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return ArrayMemory(emb[0], emb[1], model_id or clip.model_id)


@pytest.fixture(scope="module")
def clip():
    from reco.clip import load_clip

    torch.manual_seed(0)
    return load_clip("reco-tiny")


def meta_for(clip, **train):
    return {"train": {"fusion": "transformer", "image_context": "v_img_txt",
                      "text_context": "t_txt_img", "k": 4, **train},
            "dim": clip.embed_dim, "k": train.get("k", 4), "model_id": clip.model_id}


@pytest.fixture()
def model(clip):
    return RecoModel(clip, random_memory(clip), perturbed_heads(clip.embed_dim), meta_for(clip))


@pytest.fixture(scope="module")
def batch(clip):
    torch.manual_seed(1)
    return torch.randn(3, 3, clip.image_size, clip.image_size), clip.tokenizer(["a red circle", "a", "zz"])


@torch.no_grad()
def test_shapes_and_normalisation(model, batch):
    images, tokens = batch
    img, txt = model.encode_image(images), model.encode_text(tokens)
    assert img.shape == txt.shape == (3, model.loaded_clip.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(model.encode_image(images, normalize=True), img, atol=1e-6)
    i2, t2, scale = model(images, tokens)
    assert torch.allclose(i2, img, atol=1e-6) and torch.allclose(t2, txt, atol=1e-6)
    assert scale.item() > 0


@torch.no_grad()
def test_mode_off_is_plain_clip_exactly(model, clip, batch):
    images, tokens = batch
    model.mode = "off"
    for normalize in (False, True):
        assert torch.equal(model.encode_image(images, normalize=normalize),
                           clip.model.encode_image(images, normalize=normalize))
        assert torch.equal(model.encode_text(tokens, normalize=normalize),
                           clip.model.encode_text(tokens, normalize=normalize))
    assert model.memory.calls == []               # no retrieval at all


@torch.no_grad()
def test_mode_switching_changes_only_its_side(model, clip, batch):
    images, tokens = batch
    plain_img = F.normalize(clip.model.encode_image(images), dim=-1)
    plain_txt = F.normalize(clip.model.encode_text(tokens), dim=-1)
    out = {}
    for mode in ("off", "image", "text", "both"):
        model.mode = mode
        out[mode] = (model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True))
    assert torch.allclose(out["image"][1], plain_txt, atol=1e-6)
    assert not torch.allclose(out["image"][0], plain_img, atol=1e-3)
    assert torch.allclose(out["text"][0], plain_img, atol=1e-6)
    assert not torch.allclose(out["text"][1], plain_txt, atol=1e-3)
    assert torch.allclose(out["both"][0], out["image"][0], atol=1e-6)
    assert torch.allclose(out["both"][1], out["text"][1], atol=1e-6)
    with pytest.raises(ConfigError, match="choose one of"):
        model.mode = "everything"


@torch.no_grad()
def test_fuse_on_embeddings_matches_encode(model, clip, batch):
    images, _ = batch
    v = clip.model.encode_image(images)
    fused = model.fuse_image_embeddings(v.numpy())
    assert isinstance(fused, np.ndarray)
    assert np.allclose(fused, model.encode_image(images).numpy(), atol=1e-5)
    assert model.memory.calls[-1] == ("v_img_txt", 4)


@torch.no_grad()
def test_k_at_inference_differs_from_training(model, clip, batch):
    images, tokens = batch
    assert model.k == model.train_k == 4
    a = model.encode_image(images)
    model.k = 12
    b = model.encode_image(images)
    model.encode_text(tokens)
    assert model.memory.calls[-2:] == [("v_img_txt", 12), ("t_txt_img", 12)]
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ConfigError, match=">= 1"):
        model.k = 0
    again = RecoModel(clip, model.memory, dict(model.heads), model.meta, k=7)
    assert again.k == 7


def test_context_fields_come_from_meta(clip, batch):
    meta = meta_for(clip, image_context="v_img_img", text_context="t_img_txt")
    memory = random_memory(clip)
    model = RecoModel(clip, memory, perturbed_heads(clip.embed_dim), meta)
    with torch.no_grad():
        model.encode_image(batch[0])
        model.encode_text(batch[1])
    assert [f for f, _ in memory.calls] == ["v_img_img", "t_img_txt"]


def test_memory_swap_and_mismatch(model, clip, batch):
    bigger = random_memory(clip, n=500, seed=3)
    with torch.no_grad():
        a = model.encode_image(batch[0])
        model.memory = bigger
        b = model.encode_image(batch[0])
    assert model.memory is bigger and not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(MismatchError, match="memory built with model"):
        model.memory = random_memory(clip, model_id="ViT-B-32|openai")
    with pytest.raises(MismatchError, match="dimension"):
        model.memory = random_memory(clip, dim=32)
    assert model.memory is bigger


def test_heads_of_another_model_are_refused(clip):
    meta = {**meta_for(clip), "model_id": "ViT-B-32|openai"}
    with pytest.raises(MismatchError, match="heads trained"):
        RecoModel(clip, random_memory(clip), perturbed_heads(clip.embed_dim), meta)


def test_missing_head_limits_modes(clip, batch):
    model = RecoModel(clip, random_memory(clip), perturbed_heads(clip.embed_dim, sides=("image",)),
                      meta_for(clip, fuse_text=False), mode="image")
    assert model.available_modes() == ["off", "image"]
    with pytest.raises(ConfigError, match="needs the text head"):
        model.mode = "both"


@torch.no_grad()
def test_clip_benchmark_zeroshot_functions_run_on_the_reco_model(model):
    """CLIP_benchmark's own classifier and classification loop, unchanged, on a RecoModel (the
    generated-world version with its numbers: tests/test_clip_benchmark.py)."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from PIL import Image

    classnames, templates = ["circle", "square", "star"], ["a photo of a {c}.", "a {c}."]
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(5)]
    loader = [(torch.stack([model.preprocess(im) for im in pil]), torch.tensor([0, 1, 2, 0, 1]))]
    outputs = {}
    for mode in ("both", "off"):
        model.mode = mode
        classifier = zero_shot_classifier(model, model.tokenizer, classnames, templates, "cpu", amp=False)
        logits, target = run_classification(model, classifier, loader, "cpu", amp=False)
        assert classifier.shape[1] == 3 and logits.shape == (5, 3)
        outputs[mode] = logits
    assert not torch.allclose(outputs["both"], outputs["off"], atol=1e-3)
