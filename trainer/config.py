"""Config of the fusion heads and their training."""
from __future__ import annotations

from dataclasses import dataclass, field

from reco import options as o
from reco.formats import CONTEXT_FIELDS

FUSIONS = ("transformer", "attention", "token_dropout", "noisy_memory", "weighted", "mean", "mlp")  # heads.HEADS
PRECISIONS = ("fp32", "amp", "amp_bf16")         # reco.trainer.train.PRECISIONS


@dataclass(frozen=True)
class HeadConfig:
    layers: int = 1                    # transformer layers of each fusion head (RECO: one)
    heads: int = 8                     # attention heads
    mlp_ratio: float = 4.0             # feed-forward width / embedding dimension
    dropout: float = 0.0
    # training-time perturbations of the retrieved set (trainer/heads.py): the share of retrieved
    # tokens dropped by the ``token_dropout`` head, replaced by random other memory items (from
    # other queries of the batch) by the ``noisy_memory`` head
    token_dropout: float = 0.3
    memory_noise: float = 0.3

    SECTION = "train.head"
    RULES = dict(layers=o.Range(1, 64), heads=o.Range(1, 64), mlp_ratio=o.Range(0, 64, lo_open=True),
                 dropout=o.Range(0, 1, lo_open=False), token_dropout=o.Range(0, 0.99),
                 memory_noise=o.Range(0, 1))

    def __post_init__(self):
        o.check(self)


@dataclass(frozen=True)
class TrainConfig:
    """``fusion``: a head of ``reco.trainer.heads.HEADS``: transformer (RECO) | attention (no
    feed-forward) | token_dropout | noisy_memory (transformer trained on a perturbed retrieved
    set) | weighted (reweights the retrieved set) | mean (no parameters) | mlp (same capacity,
    no retrieval).
    Each side's context is a field of ``reco.formats`` (query_search_fuse): the defaults are
    RECO's uni-modal search with cross-modal fusion; the ablations change them."""

    fusion: str = "transformer"
    fuse_image: bool = True            # train/use phi_image (v-bar)
    fuse_text: bool = True             # train/use phi_text (t-bar)
    image_context: str = "v_img_txt"
    text_context: str = "t_txt_img"
    k: int = 10                        # neighbours used per query (<= neighbours.k)
    head: HeadConfig = field(default_factory=HeadConfig)
    batch_size: int = 512              # global batch (split across DDP ranks)
    lr: float = 1e-3                   # AdamW peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 1e-5         # AdamW, on weight matrices only
    warmup_steps: int = 50
    steps: int = 1000
    init_temperature: float = 0.07     # the learned temperature's start
    shuffle_buffer: int = 8192         # streamed pairs held for shuffling
    num_workers: int = 0               # DataLoader workers reading the neighbour shards
    checkpoint_every: int = 200        # steps between safetensors checkpoints (exact resume)
    seed: int = 0
    precision: str = "fp32"           # amp_bf16 / amp on GPU

    SECTION = "train"
    RULES = dict(fusion=o.Choice(FUSIONS), image_context=o.Choice(CONTEXT_FIELDS),
                 text_context=o.Choice(CONTEXT_FIELDS), k=o.Range(1, o.MAX_K),
                 batch_size=o.Range(1, 1 << 16), lr=o.Range(0, 10, lo_open=True), weight_decay=o.Range(0, 10),
                 warmup_steps=o.Range(0, o.MAX_ROWS), steps=o.Range(1, o.MAX_ROWS),
                 init_temperature=o.Range(0, 10, lo_open=True), shuffle_buffer=o.Range(1, o.MAX_ROWS),
                 num_workers=o.Range(0, 256), checkpoint_every=o.Range(1, o.MAX_ROWS), seed=o.SEED,
                 precision=o.Choice(PRECISIONS))

    def __post_init__(self):
        o.check(self)
