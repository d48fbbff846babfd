"""Shim for ``--setup_file`` (Beam on Dataflow ships reco to its workers as an sdist).

All metadata lives in pyproject.toml; this file only lets Beam's stager fall back to
``python setup.py sdist`` when the ``build`` module is not installed (Beam's pyproject.toml
path needs it). Usage: ``--setup_file=./setup.py`` (the default of reco's Dataflow preset).
"""
from setuptools import setup

setup()
