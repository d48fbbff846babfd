"""Config of the generated world: defined in :mod:`reco.fixture_config` (so that
:mod:`reco.config` never imports ``reco.world``), re-exported here."""
from reco.fixture_config import (BASE_CLIP_PRESETS, WORLD_PRESETS, BaseClipConfig,  # noqa: F401
                                 WorldConfig)
