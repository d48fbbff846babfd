"""Fusion heads: refine a query embedding with its k retrieved memory embeddings.

Every head maps ``query (B, d)`` and ``context (B, k, d)`` to an L2-normalised ``(B, d)``
embedding. Heads are built by name from :data:`HEADS` with :func:`build_head`:

* ``transformer`` (RECO): a small transformer encoder over ``[query; context_1..k]`` with a learned
  type embedding (query vs. retrieved) and a learned rank embedding for the retrieved tokens; the
  output is read at the query position. Output projections start at zero, so at step 0 the head
  returns the (normalised) query: training starts from the frozen CLIP.
* ``mean``: no parameters, ``normalise(mean([query; valid context]))`` (the paper's averaging
  baseline; missing neighbours, i.e. zero rows, are left out of the mean).
* ``mlp``: same capacity as the transformer head but no retrieval (the context is ignored): a
  residual pre-norm MLP stack on the query alone.

Variants that test the paper's mechanism (a learned head omits or enhances retrieved items;
issue 20, ``python -m experiments.longtail``):

* ``attention``: the transformer without its feed-forward layers (attention and residual only):
  the query can only take in linear maps of what it attends to;
* ``token_dropout``: the transformer, trained with a random ``head.token_dropout`` share of the
  retrieved tokens removed (masked as missing neighbours); whole at inference;
* ``noisy_memory``: the transformer, trained with a random ``head.memory_noise`` share of the
  retrieved tokens replaced by the retrieved tokens of other queries of the batch (irrelevant
  memory items, a deliberately noisy memory); clean at inference;
* ``weighted``: ``normalise(sum_j w_j x_j)`` over ``x = [query; context]`` with softmax weights
  from a learned bilinear score plus a rank bias: it can reweight and omit retrieved items but
  never produce a vector outside their (and the query's) convex cone, so it cannot memorise
  species the way a feed-forward layer can. It starts as mean fusion (uniform weights).

Missing neighbours (memory smaller than k) are zero rows; the transformer masks them out.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from reco.errors import ConfigError
from reco.trainer.config import HeadConfig

# Parameter count of open_clip ViT-B-32 (image + text towers), for the "~2%" sanity ratio.
CLIP_B32_PARAMS = 151_277_313
MAX_RANK_EMBEDDINGS = 64


def _valid_mask(context: torch.Tensor) -> torch.Tensor:
    """(B, k) bool: True where a neighbour is present (non-zero row)."""
    return context.abs().amax(dim=-1) > 0


class FusionHead(nn.Module):
    """RECO's transformer fusion head (``layers`` pre-norm encoder layers of width ``dim``)."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        if dim % cfg.heads:
            raise ConfigError(f"train.head.heads={cfg.heads} does not divide the embedding dim {dim}")
        self.dim = dim
        self.type_embedding = nn.Parameter(torch.zeros(2, dim))            # 0: query, 1: retrieved
        self.rank_embedding = nn.Parameter(torch.zeros(MAX_RANK_EMBEDDINGS, dim))
        layer = nn.TransformerEncoderLayer(
            dim, cfg.heads, dim_feedforward=int(round(dim * cfg.mlp_ratio)), dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        for enc_layer in self.encoder.layers:
            enc_layer.self_attn.in_proj_bias.register_hook(self._no_key_bias_grad)
        self.reset_parameters()

    def _no_key_bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        # softmax is invariant to the key bias: its true gradient is 0, and Adam would otherwise
        # amplify float round-off into random updates (breaking run-to-run/DDP equivalence).
        grad = grad.clone()
        grad[self.dim:2 * self.dim] = 0
        return grad

    def reset_parameters(self) -> None:
        nn.init.normal_(self.type_embedding, std=0.02)
        nn.init.normal_(self.rank_embedding, std=0.02)
        with torch.no_grad():
            self.type_embedding[0].zero_()        # the query token enters unchanged
        for layer in self.encoder.layers:         # residual branches start at zero
            nn.init.zeros_(layer.self_attn.out_proj.weight)
            nn.init.zeros_(layer.self_attn.out_proj.bias)
            nn.init.zeros_(layer.linear2.weight)
            nn.init.zeros_(layer.linear2.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens, pad = _tokens(self, query, context)
        out = self.encoder(tokens, src_key_padding_mask=pad)
        return F.normalize(out[:, 0], dim=-1)


class MeanFusion(nn.Module):
    """normalise(mean of the query and its valid retrieved embeddings); no parameters."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        self.dim = dim

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        valid = _valid_mask(context).to(query.dtype).unsqueeze(-1)
        total = query + (context.to(query.dtype) * valid).sum(dim=1)
        return F.normalize(total / (1 + valid.sum(dim=1)), dim=-1)


class TokenDropoutHead(FusionHead):
    """:class:`FusionHead` trained with ``cfg.token_dropout`` of the retrieved tokens removed."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__(dim, cfg)
        if not 0.0 <= cfg.token_dropout < 1.0:
            raise ConfigError(f"train.head.token_dropout={cfg.token_dropout}: must be in [0, 1)")
        self.p = cfg.token_dropout

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0:
            keep = torch.rand(context.shape[:2], device=context.device) >= self.p
            context = context * keep.unsqueeze(-1).to(context.dtype)
        return super().forward(query, context)


class NoisyMemoryHead(FusionHead):
    """:class:`FusionHead` trained with ``cfg.memory_noise`` of the retrieved tokens replaced by
    random retrieved tokens of other queries in the batch (a memory with irrelevant items)."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__(dim, cfg)
        if not 0.0 <= cfg.memory_noise <= 1.0:
            raise ConfigError(f"train.head.memory_noise={cfg.memory_noise}: must be in [0, 1]")
        self.p = cfg.memory_noise

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0:
            context = corrupt_context(context, self.p)
        return super().forward(query, context)


def corrupt_context(context: torch.Tensor, p: float) -> torch.Tensor:
    """``context`` (B, k, d) with each token replaced, with probability ``p``, by a random token
    of a random other row (rows of one query are never their own replacement when B > 1)."""
    b, k, _ = context.shape
    swap = torch.rand(b, k, device=context.device) < p
    shift = torch.randint(1, max(2, b), (b, k), device=context.device) if b > 1 else torch.zeros(
        b, k, dtype=torch.long, device=context.device)
    rows = (torch.arange(b, device=context.device).unsqueeze(1) + shift) % b
    cols = torch.randint(0, k, (b, k), device=context.device)
    return torch.where(swap.unsqueeze(-1), context[rows, cols], context)


class AttentionOnlyHead(nn.Module):
    """The transformer head without feed-forward layers: ``layers`` x (pre-norm multi-head
    attention + residual) over ``[query; context]``, read at the query; output projections start
    at zero (step 0 returns the query)."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        if dim % cfg.heads:
            raise ConfigError(f"train.head.heads={cfg.heads} does not divide the embedding dim {dim}")
        self.dim = dim
        self.type_embedding = nn.Parameter(torch.zeros(2, dim))
        self.rank_embedding = nn.Parameter(torch.zeros(MAX_RANK_EMBEDDINGS, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(cfg.layers))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, cfg.heads, dropout=cfg.dropout,
                                                         batch_first=True) for _ in range(cfg.layers))
        nn.init.normal_(self.type_embedding, std=0.02)
        nn.init.normal_(self.rank_embedding, std=0.02)
        with torch.no_grad():
            self.type_embedding[0].zero_()
        for attn in self.attns:
            nn.init.zeros_(attn.out_proj.weight)
            nn.init.zeros_(attn.out_proj.bias)
            attn.in_proj_bias.register_hook(self._no_key_bias_grad)

    _no_key_bias_grad = FusionHead._no_key_bias_grad

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens, pad = _tokens(self, query, context)
        for norm, attn in zip(self.norms, self.attns):
            h = norm(tokens)
            tokens = tokens + attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return F.normalize(tokens[:, 0], dim=-1)


def _tokens(head: nn.Module, query: torch.Tensor, context: torch.Tensor):
    """``[query; context]`` with type and rank embeddings, and the padding mask (or None)."""
    b, k, _ = context.shape
    if k > MAX_RANK_EMBEDDINGS:
        raise ConfigError(f"k={k} neighbours exceeds the head's {MAX_RANK_EMBEDDINGS} rank slots")
    ctx = context.to(query.dtype) + head.type_embedding[1] + head.rank_embedding[:k]
    tokens = torch.cat([(query + head.type_embedding[0]).unsqueeze(1), ctx], dim=1)
    pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=query.device),
                     ~_valid_mask(context)], dim=1)
    return tokens, (pad if bool(pad.any()) else None)


class WeightedFusion(nn.Module):
    """``normalise(sum_j softmax(s)_j x_j)`` over ``x = [query; valid context]``, with
    ``s_j = <A q, B x_j> / sqrt(d) + bias_j`` (bias: one for the query, one per rank). Only
    reweights and omits: the output lies in the convex cone of the query and its neighbours.
    ``B`` and the biases start at zero, so step 0 is mean fusion."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        self.dim = dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.rank_bias = nn.Parameter(torch.zeros(1 + MAX_RANK_EMBEDDINGS))   # 0: the query
        nn.init.normal_(self.q_proj.weight, std=dim ** -0.5)
        nn.init.zeros_(self.k_proj.weight)

    def weights(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, 1 + k) softmax weights of ``[query; context]`` (0 for missing neighbours)."""
        k = context.shape[1]
        if k > MAX_RANK_EMBEDDINGS:
            raise ConfigError(f"k={k} neighbours exceeds the head's {MAX_RANK_EMBEDDINGS} rank slots")
        items = torch.cat([query.unsqueeze(1), context.to(query.dtype)], dim=1)
        scores = torch.einsum("bd,bjd->bj", self.q_proj(query), self.k_proj(items)) / self.dim ** 0.5
        scores = scores + self.rank_bias[:k + 1]
        valid = torch.cat([torch.ones_like(scores[:, :1], dtype=torch.bool), _valid_mask(context)], 1)
        return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        w = self.weights(query, context)
        items = torch.cat([query.unsqueeze(1), context.to(query.dtype)], dim=1)
        return F.normalize((w.unsqueeze(-1) * items).sum(dim=1), dim=-1)


def transformer_params(dim: int, cfg: HeadConfig) -> int:
    """Parameter count of :class:`FusionHead` without building it."""
    hidden = int(round(dim * cfg.mlp_ratio))
    per_layer = 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim
    return cfg.layers * per_layer + (2 + MAX_RANK_EMBEDDINGS) * dim


class MLPHead(nn.Module):
    """No retrieval: ``layers`` residual pre-norm MLP blocks on the query, hidden width chosen so
    that the parameter count matches :class:`FusionHead` (within a fraction of a percent)."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()):
        super().__init__()
        self.dim = dim
        target = transformer_params(dim, cfg) / cfg.layers
        hidden = max(1, int(round((target - 3 * dim) / (2 * dim + 1))))   # LN 2d + 2dh + h + d
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(hidden, dim)) for _ in range(cfg.layers))
        for block in self.blocks:
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = query
        for block in self.blocks:
            x = x + block(x)
        return F.normalize(x, dim=-1)


HEADS: dict[str, Callable[[int, HeadConfig], nn.Module]] = {
    "transformer": FusionHead,
    "attention": AttentionOnlyHead,
    "token_dropout": TokenDropoutHead,
    "noisy_memory": NoisyMemoryHead,
    "weighted": WeightedFusion,
    "mean": MeanFusion,
    "mlp": MLPHead,
}


def build_head(fusion: str, dim: int, head_cfg: HeadConfig = HeadConfig()) -> nn.Module:
    """The head named ``fusion`` (a key of :data:`HEADS`) for embeddings of width ``dim``."""
    if fusion not in HEADS:
        raise ConfigError(f"train.fusion={fusion!r}: unknown fusion head; choose one of {sorted(HEADS)}")
    if dim <= 0 or head_cfg.layers < 1 or head_cfg.heads < 1 or head_cfg.mlp_ratio <= 0:
        raise ConfigError(f"bad head config {head_cfg} for dim {dim}")
    return HEADS[fusion](dim, head_cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
