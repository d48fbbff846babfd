"""REACT customisation (Liu et al., CVPR 2023) of the frozen CLIP, beside RECO.

  retrieve.py  react-retrieve: class prompts -> memory index -> customisation set (Parquet)
  images.py    where pixels come from (the world's files, or an ``image`` column)
  gated.py     gated residual blocks in the frozen ViT (locked-text gated-image tuning)
  train.py     react-train: contrastive tuning of the gated blocks only
  model.py     ReactModel: open_clip-like drop-in, loaded from its folder in one call
  evaluate.py  zero-shot: frozen CLIP vs REACT with reco.evaluation's metrics
"""
