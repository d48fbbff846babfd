"""Head variants of issue 20 (trainer/heads.py): attention-only, retrieved-token dropout, noisy
memory, learned per-item weighting. Each is one key of the head registry."""
import pytest
import torch
import torch.nn.functional as F

from reco.errors import ConfigError
from reco.trainer.config import HeadConfig, TrainConfig
from reco.trainer.heads import HEADS, FusionHead, build_head, corrupt_context

VARIANTS = ("attention", "token_dropout", "noisy_memory", "weighted")
CFG = HeadConfig(heads=4)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(old)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _perturb(module, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_every_variant_is_a_registry_option_and_a_fusion_config():
    assert set(VARIANTS) <= set(HEADS)
    for name in VARIANTS:
        assert TrainConfig(fusion=name).fusion == name
        assert build_head(name, 32, CFG)(_unit(2, 32), _unit(2, 3, 32, seed=1)).shape == (2, 32)


@pytest.mark.parametrize("fusion", ["attention", "token_dropout", "noisy_memory"])
def test_transformer_like_variants_start_at_the_query(fusion):
    head = build_head(fusion, 32, CFG)
    q, ctx = _unit(4, 32), _unit(4, 5, 32, seed=1)
    head.train()
    assert torch.allclose(head(q, ctx), q, atol=1e-6)


def test_weighted_starts_as_mean_fusion():
    q, ctx = _unit(4, 32), _unit(4, 5, 32, seed=1)
    ctx[0, 3:] = 0                                                     # missing neighbours
    assert torch.allclose(build_head("weighted", 32, CFG)(q, ctx), build_head("mean", 32, CFG)(q, ctx),
                          atol=1e-6)


def test_weighted_only_reweights_the_retrieved_set():
    """Whatever its parameters, the weighted head's output is a non-negative combination of the
    query and its (present) neighbours: it cannot produce a direction of its own."""
    head = build_head("weighted", 32, CFG)
    _perturb(head, scale=3.0)
    q, ctx = _unit(6, 32), _unit(6, 4, 32, seed=1)
    ctx[1, 2:] = 0
    w = head.weights(q, ctx)
    assert torch.all(w >= 0) and torch.allclose(w.sum(-1), torch.ones(6), atol=1e-6)
    assert torch.all(w[1, 3:] == 0)                                    # missing ones get nothing
    out = head(q, ctx)
    for i in range(6):
        basis = torch.cat([q[i:i + 1], ctx[i]]).T                      # (d, 1 + k)
        coef = torch.linalg.lstsq(basis, out[i:i + 1].T).solution
        assert torch.allclose(basis @ coef, out[i:i + 1].T, atol=1e-4)  # inside the span


def test_attention_only_has_no_feed_forward_and_masks_missing_neighbours():
    head = build_head("attention", 16, HeadConfig(heads=2, layers=2))
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(
        m, torch.nn.modules.linear.NonDynamicallyQuantizableLinear) for m in head.modules())
    _perturb(head)
    head.eval()
    q, ctx = _unit(3, 16), _unit(3, 4, 16, seed=1)
    padded = torch.cat([ctx[:, :2], torch.zeros(3, 2, 16)], dim=1)
    assert torch.allclose(head(q, padded), head(q, ctx[:, :2]), atol=1e-5)
    assert not torch.allclose(head(q, ctx), head(q, ctx[:, :2]), atol=1e-4)


@pytest.mark.parametrize("fusion", ["token_dropout", "noisy_memory"])
def test_perturbing_variants_are_the_transformer_at_inference(fusion):
    head = build_head(fusion, 16, HeadConfig(heads=2, token_dropout=0.9, memory_noise=1.0))
    _perturb(head)
    ref = FusionHead(16, HeadConfig(heads=2))
    ref.load_state_dict(head.state_dict())                  # same parameters, same checkpoint keys
    q, ctx = _unit(8, 16), _unit(8, 6, 16, seed=1)
    head.eval()
    ref.eval()
    assert torch.allclose(head(q, ctx), ref(q, ctx), atol=1e-6)
    head.train()
    ref.train()
    assert not torch.allclose(head(q, ctx), ref(q, ctx), atol=1e-4)


def test_corrupt_context_takes_tokens_of_other_queries():
    ctx = torch.arange(5).float().view(5, 1, 1).expand(5, 3, 2).clone() + 1   # row i holds i+1
    assert torch.equal(corrupt_context(ctx, 0.0), ctx)
    noisy = corrupt_context(ctx, 1.0)
    assert noisy.shape == ctx.shape
    assert torch.all(noisy[..., 0] != ctx[..., 0])                      # never its own row


def test_bad_perturbation_rates_are_refused():
    with pytest.raises(ConfigError, match="token_dropout"):
        build_head("token_dropout", 16, HeadConfig(heads=2, token_dropout=1.0))
    with pytest.raises(ConfigError, match="memory_noise"):
        build_head("noisy_memory", 16, HeadConfig(heads=2, memory_noise=1.5))


@pytest.mark.parametrize("fusion", VARIANTS)
def test_variants_train(fusion):
    """A few optimiser steps of the RECO loss move every variant's parameters and the loss."""
    from reco.trainer.train import build_optimizer, build_train_model

    tc = TrainConfig(fusion=fusion, head=HeadConfig(heads=2), lr=1e-2)
    model = build_train_model(tc, 16)
    opt = build_optimizer(model, tc)
    g = torch.Generator().manual_seed(3)
    batch = {"v": torch.randn(32, 16, generator=g), "t": torch.randn(32, 16, generator=g),
             "v_img_txt": torch.randn(32, 10, 16, generator=g), "t_txt_img": torch.randn(32, 10, 16, generator=g)}
    before = {n: p.detach().clone() for n, p in model.heads.named_parameters()}
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = model(batch)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    moved = [n for n, p in model.heads.named_parameters() if not torch.equal(p, before[n])]
    assert moved and losses[-1] < losses[0]



def test_config_fusions_are_the_head_registry():
    """The fusion names a config accepts are exactly the heads the trainer can build."""
    from reco.trainer.config import FUSIONS
    from reco.trainer.heads import HEADS

    assert set(FUSIONS) == set(HEADS)
