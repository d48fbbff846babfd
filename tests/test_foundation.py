import pytest

from reco import config as config_lib
from reco.clip import load_clip, save_local_dir
from reco.errors import ConfigError
from reco.formats import parse_field, search_keys


def test_presets_and_overrides():
    cfg = config_lib.preset("tiny")
    cfg = config_lib.override(cfg, ["train.steps=7", "train.head.heads=2", "clip.pretrained=none",
                                    "neighbours.fields=v_img_txt,t_txt_txt"])
    assert cfg.train.steps == 7 and cfg.train.head.heads == 2 and cfg.clip.pretrained is None
    assert cfg.neighbours.fields == ("v_img_txt", "t_txt_txt")
    with pytest.raises(ConfigError, match="no option 'stepz'"):
        config_lib.override(cfg, ["train.stepz=1"])
    with pytest.raises(ConfigError, match="not a valid int"):
        config_lib.override(cfg, ["train.steps=many"])


def test_config_round_trip(tmp_path):
    cfg = config_lib.preset("tiny", workdir=str(tmp_path))
    cfg.save(tmp_path / "c.json")
    assert config_lib.load(tmp_path / "c.json") == cfg


def test_project_model_config_and_local_dir_round_trip(tmp_path):
    import torch

    clip = load_clip("reco-tiny")
    assert clip.embed_dim == 64 and clip.image_size == 32
    spec = save_local_dir(clip.model, "reco-tiny", tmp_path / "m")
    again = load_clip(spec)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clip.model.encode_image(x), again.model.encode_image(x))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown open_clip model.*ViT-B-32"):
        load_clip("ViT-B-33")


def test_context_fields():
    assert parse_field("v_img_txt") == ("v", "img", "txt")
    assert search_keys(("v_img_txt", "v_img_img", "t_txt_img")) == ["t_txt", "v_img"]
    with pytest.raises(Exception, match="bad context field"):
        parse_field("v_nn_t")
