"""reco: retrieval-enhanced contrastive vision-text models on top of open_clip.

Sub-packages:
  reco.world       generated fine-grained world (images, captions, loopback server, base CLIP)
  reco.pipelines   Beam jobs (embed-memory, neighbours)          [folder: pipelines/]
  reco.index       faiss/autofaiss memory indices               [folder: index/]
  reco.trainer     fusion heads, loss, streaming loader, loop   [folder: trainer/]
  reco.evaluation  zero-shot / retrieval evaluation, gallery, query, compare
  reco.react       REACT customisation (retrieve, download, train)
(The ablations and other studies live outside the library, in the repo's experiments/.)
"""

__version__ = "0.1.0"



def load_model(*args, **kwargs):
    """``reco.load_model(workdir_or_heads_dir, mode="both", k=None)``: a drop-in model in one
    call (:func:`reco.model.load_model`; imported lazily so ``import reco`` stays light)."""
    from reco.model import load_model as _load

    return _load(*args, **kwargs)
