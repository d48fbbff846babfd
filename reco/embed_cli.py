"""``reco embed-memory``: the Beam job (:mod:`reco.pipelines.embed_memory`), and for the world's
splits the world served on its own port with the server's identity checked first
(:func:`reco.world.serving.serve_world`). The pipelines never import the world package."""
from __future__ import annotations

from reco.pipelines import embed_memory as job

add_arguments = job.add_arguments


def main(cfg, args) -> int:
    if args.input:                        # the user's URL lists: nothing to serve
        return job.main(cfg, args)
    from reco.world.serving import serve_world

    with serve_world(cfg):
        return job.main(cfg, args)
