"""Fusion heads and the RECO loss (against a straightforward reference)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reco.errors import ConfigError
from reco.trainer.config import HeadConfig
from reco.trainer.heads import CLIP_B32_PARAMS, HEADS, build_head, count_params, transformer_params
from reco.trainer.loss import RecoLoss


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _perturb(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("fusion", sorted(HEADS))
def test_heads_shapes_and_normalisation(fusion):
    head = build_head(fusion, 32, HeadConfig(heads=4))
    q, ctx = _unit(5, 32), _unit(5, 3, 32, seed=1)
    _perturb(head)
    out = head(q, ctx)
    assert out.shape == (5, 32)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_transformer_starts_at_the_query_and_param_count():
    head = build_head("transformer", 32, HeadConfig(heads=4, layers=2, mlp_ratio=2.0))
    q, ctx = _unit(4, 32), _unit(4, 5, 32, seed=1)
    assert torch.allclose(head(q, ctx), q, atol=1e-6)
    assert count_params(head) == transformer_params(32, HeadConfig(heads=4, layers=2, mlp_ratio=2.0))


def test_transformer_masks_missing_neighbours_and_uses_context():
    head = build_head("transformer", 16, HeadConfig(heads=2))
    _perturb(head)
    head.eval()
    q, ctx = _unit(3, 16), _unit(3, 4, 16, seed=1)
    padded = torch.cat([ctx[:, :2], torch.zeros(3, 2, 16)], dim=1)
    assert torch.allclose(head(q, padded), head(q, ctx[:, :2]), atol=1e-5)
    assert not torch.allclose(head(q, ctx), head(q, ctx[:, :2]), atol=1e-4)
    no_ctx = head(q, torch.zeros(3, 4, 16))                 # all missing: still finite
    assert torch.isfinite(no_ctx).all()


def test_mean_fusion_is_the_average_of_query_and_valid_neighbours():
    head = build_head("mean", 8)
    assert count_params(head) == 0
    q, ctx = _unit(2, 8), _unit(2, 3, 8, seed=1)
    ctx[1, 2] = 0                                            # a missing neighbour
    want0 = F.normalize((q[0] + ctx[0].sum(0)) / 4, dim=-1)
    want1 = F.normalize((q[1] + ctx[1, :2].sum(0)) / 3, dim=-1)
    assert torch.allclose(head(q, ctx), torch.stack([want0, want1]), atol=1e-6)


def test_mlp_ignores_context_and_matches_capacity():
    cfg = HeadConfig(heads=8)
    mlp, tr = build_head("mlp", 512, cfg), build_head("transformer", 512, cfg)
    assert abs(count_params(mlp) / count_params(tr) - 1) < 0.01
    q = _unit(3, 512)
    assert torch.allclose(mlp(q, _unit(3, 2, 512, seed=1)), q, atol=1e-6)       # residual init
    _perturb(mlp)
    assert torch.equal(mlp(q, _unit(3, 2, 512, seed=1)), mlp(q, _unit(3, 2, 512, seed=2)))


def test_default_head_is_about_two_percent_of_clip_b32():
    ratio = count_params(build_head("transformer", 512, HeadConfig())) / CLIP_B32_PARAMS
    assert 0.015 < ratio < 0.025, ratio


def test_bad_head_options_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown fusion head"):
        build_head("gru", 32)
    with pytest.raises(ConfigError, match="does not divide"):
        build_head("transformer", 30, HeadConfig(heads=4))


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------

def _ref_nce(a, b, scale):
    """Symmetric InfoNCE with explicit loops (float64)."""
    a, b = a.double(), b.double()
    n = a.shape[0]
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            logits = [scale * float(x[i] @ y[j]) for j in range(n)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(l - m) for l in logits))
            total += (lse - logits[i]) / n
    return total / 2


@pytest.mark.parametrize("sides,terms", [((True, True), [("vb", "tb"), ("vb", "t"), ("v", "tb")]),
                                         ((True, False), [("vb", "t")]),
                                         ((False, True), [("v", "tb")])])
def test_loss_matches_reference(sides, terms):
    f = {name: _unit(6, 8, seed=i) for i, name in enumerate(("v", "t", "vb", "tb"))}
    loss = RecoLoss(fuse_image=sides[0], fuse_text=sides[1], init_temperature=0.1)
    out = loss(f["v"], f["t"], f["vb"] if sides[0] else None, f["tb"] if sides[1] else None)
    want = sum(_ref_nce(f[a], f[b], 10.0) for a, b in terms)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    assert len([k for k in out if k.startswith("nce_")]) == len(terms)
    # distributed options are no-ops in one process
    local = RecoLoss(fuse_image=sides[0], fuse_text=sides[1], init_temperature=0.1,
                     local_loss=True, gather_with_grad=True)
    out2 = local(f["v"], f["t"], f["vb"] if sides[0] else None, f["tb"] if sides[1] else None)
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_loss_temperature_is_learned_and_clamped():
    loss = RecoLoss(init_temperature=0.07)
    assert loss.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    v, t = _unit(4, 8), _unit(4, 8, seed=1)
    vb, tb = v.clone().requires_grad_(), t.clone().requires_grad_()
    loss(v, t, vb, tb)["loss"].backward()
    assert loss.logit_scale.grad is not None and vb.grad is not None and tb.grad is not None
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    assert loss.scale().item() == pytest.approx(100.0, rel=1e-5)
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(math.log(100), rel=1e-6)
    with pytest.raises(ConfigError, match="nothing to train"):
        RecoLoss(fuse_image=False, fuse_text=False)
    with pytest.raises(ValueError, match="needs 'tb'"):
        RecoLoss()(v, t, vb, None)


def test_loss_is_low_for_matching_pairs():
    x = _unit(16, 32)
    loss = RecoLoss(fuse_image=True, fuse_text=False, init_temperature=0.01)
    assert loss(x, x, x, None)["loss"].item() < 1e-3
    assert loss(x, x, _unit(16, 32, seed=3), None)["loss"].item() > np.log(16) / 2
