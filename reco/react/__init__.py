"""REACT customisation (Liu et al., CVPR 2023) of the frozen CLIP, beside RECO.

  config.py    ReactConfig: the run config's ``react`` section (--set react.*)
  retrieve.py  react-retrieve: class prompts -> memory index -> customisation set (URL list)
  download.py  react-download: the set's images -> webdataset tar shards (Beam + img2dataset)
  shards.py    tar shards: writer, sharded streaming IterableDataset (webdataset)
  data.py      react-train's batches: streamed from shards, or an in-memory tensor
  images.py    in-memory pixel sources (test fixtures: the world's files; an ``image`` column)
  gated.py     gated residual blocks in the frozen ViT (locked-text gated-image tuning)
  train.py     react-train: contrastive tuning of the gated blocks only (DDP, resume)
  model.py     ReactModel: open_clip-like drop-in, loaded from its folder in one call
  evaluate.py  zero-shot: frozen CLIP vs REACT with reco.evaluation's metrics
"""
