"""See the package docstring in reco/__init__.py."""
