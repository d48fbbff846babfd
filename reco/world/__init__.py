"""The generated fine-grained world (see the package docstring in reco/__init__.py).

Modules: ``species`` (attribute combinations + invented names), ``render`` (PNG of a specimen),
``captions`` (attribute / name / mixed / generic / wrong-name captions), ``build`` (world on
disk, ``run_world``), ``base_clip`` (the frozen CLIP trained on the pretraining split),
``server`` (loopback HTTP, hostile endpoints), ``cli`` / ``serve_cli`` (commands).
"""
