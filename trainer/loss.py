"""RECO's contrastive loss: L = NCE(V̄,T̄) + NCE(V̄,T) + NCE(V,T̄) with a learned temperature.

NCE is CLIP's symmetric InfoNCE. Training one side only keeps the term that involves it:
image-only NCE(V̄,T), text-only NCE(V,T̄) (paper, Table 4 rows 1-2). Distributed options follow
open_clip's ``ClipLoss`` and are constructor arguments, so the module runs (and is tested) in one
process with ``world_size=1``:

* ``gather_with_grad``: all-gather features with ``torch.distributed.nn.all_gather`` (gradients
  flow back to the rank that produced them). With DDP's gradient averaging this gives exactly the
  single-process gradient of the global batch; the trainer always uses it.
* ``local_loss``: each rank scores only its own rows against all gathered ones (memory O(B*N)
  instead of O(N^2)); the mean over ranks equals the global loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reco.errors import ConfigError

# (anchor, other) pairs of the loss terms; "v"/"t" are frozen CLIP embeddings, "vb"/"tb" fused.
TERMS = {
    (True, True): (("vb", "tb"), ("vb", "t"), ("v", "tb")),
    (True, False): (("vb", "t"),),
    (False, True): (("v", "tb"),),
}


def gather_features(x: torch.Tensor, *, rank: int, world_size: int, gather_with_grad: bool,
                    local_loss: bool) -> torch.Tensor:
    """Concatenate ``x`` (B, d) of all ranks in rank order -> (world_size * B, d)."""
    if world_size == 1:
        return x
    import torch.distributed as dist

    if gather_with_grad:
        import warnings

        import torch.distributed.nn

        with warnings.catch_warnings():          # deprecated name, same autograd-aware gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach())
    if not local_loss:
        parts[rank] = x                      # keep the local gradient path
    return torch.cat(parts, dim=0)


class RecoLoss(nn.Module):
    """Sum of symmetric InfoNCE terms between frozen and fused embeddings.

    Args:
        fuse_image / fuse_text: which fused sides exist (at least one).
        init_temperature: initial softmax temperature (logit scale = log(1/T), learned).
        max_logit_scale: clamp of exp(logit_scale), CLIP's 100.
        local_loss, gather_with_grad, rank, world_size: distributed options (see module doc).
    """

    def __init__(self, *, fuse_image: bool = True, fuse_text: bool = True,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if not (fuse_image or fuse_text):
            raise ConfigError("train.fuse_image and train.fuse_text are both false: nothing to train")
        if not init_temperature > 0:
            raise ConfigError(f"train.init_temperature={init_temperature} must be > 0")
        self.terms = TERMS[(bool(fuse_image), bool(fuse_text))]
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0, self.max_log_scale).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """CLIP's in-place clamp after an optimiser step."""
        self.logit_scale.clamp_(0, self.max_log_scale)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_features(x, rank=self.rank, world_size=self.world_size,
                               gather_with_grad=self.gather_with_grad, local_loss=self.local_loss)

    def nce(self, a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
            scale: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and self.local_loss:
            logits_a, logits_b = scale * a @ b_all.T, scale * b @ a_all.T
            labels = torch.arange(a.shape[0], device=a.device) + self.rank * a.shape[0]
        else:
            logits_a = scale * a_all @ b_all.T
            logits_b = logits_a.T
            labels = torch.arange(a_all.shape[0], device=a.device)
        return (F.cross_entropy(logits_a.float(), labels) + F.cross_entropy(logits_b.float(), labels)) / 2

    def forward(self, v: torch.Tensor, t: torch.Tensor, v_bar: torch.Tensor | None = None,
                t_bar: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All inputs (B, d), L2-normalised. Returns ``loss`` (the sum) and each term by name."""
        feats = {"v": v, "t": t, "vb": v_bar, "tb": t_bar}
        needed = sorted({name for term in self.terms for name in term})
        for name in needed:
            if feats[name] is None:
                raise ValueError(f"RecoLoss with terms {self.terms} needs {name!r}")
        gathered = {name: self._gather(feats[name]) for name in needed}
        scale = self.scale()
        out = {}
        for a, b in self.terms:
            out[f"nce_{a}_{b}"] = self.nce(feats[a], feats[b], gathered[a], gathered[b], scale)
        out["loss"] = sum(out.values())
        out["logit_scale"] = scale.detach()
        return out
