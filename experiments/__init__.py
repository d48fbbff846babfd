"""Experiments on reco, outside the library: they use only reco's public API, and reco never
imports them. Each is a module run with ``python -m experiments.<name>`` (see its docstring)."""
