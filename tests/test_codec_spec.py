"""Every command reads `--codec` the same way (unimoe/codecs/spec.py)."""

import pytest
import torch

from unimoe.codecs.spec import parse_codec_spec
from unimoe.devices import resolve_device


def test_every_form(tmp_path, monkeypatch):
    fitted = tmp_path / "codec.pt"
    fitted.write_bytes(b"x")
    assert parse_codec_spec(str(fitted)) == {"name": "spectral_rvq", "path": str(fitted.resolve())}
    monkeypatch.chdir(tmp_path)  # a relative .pt becomes absolute: the spec outlives the cwd
    assert parse_codec_spec("codec.pt") == {"name": "spectral_rvq", "path": str(fitted.resolve())}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: encodec\nbandwidth: 3.0\n")
    assert parse_codec_spec(str(yaml_file)) == {"name": "encodec", "bandwidth": 3.0}
    assert parse_codec_spec('{"name": "vocos", "pretrained": false}') == {"name": "vocos", "pretrained": False}
    assert parse_codec_spec("{name: vocos, bandwidth: 1.5}") == {"name": "vocos", "bandwidth": 1.5}
    assert parse_codec_spec(" encodec ") == "encodec"
    assert parse_codec_spec("my_pkg.codecs.MyCodec") == "my_pkg.codecs.MyCodec"


def test_bad_values_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="absent.pt"):
        parse_codec_spec(str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="not valid JSON/YAML"):
        parse_codec_spec("{name: [unclosed")
    with pytest.raises(ValueError, match="must name a codec"):
        parse_codec_spec(str(_list_yaml(tmp_path)))


def _list_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    return path


def test_generate_accepts_a_fitted_codec_file(tmp_path):
    from unimoe.generation.generator import GenerationError
    from unimoe.generation.pipeline import parse_codec_spec as generation_parse

    fitted = tmp_path / "codec.pt"
    fitted.write_bytes(b"x")
    assert generation_parse(str(fitted))["path"] == str(fitted.resolve())
    with pytest.raises(GenerationError, match="not found"):
        generation_parse(str(tmp_path / "missing.pt"))


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
