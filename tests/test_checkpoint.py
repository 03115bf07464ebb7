"""Self-describing checkpoints rebuild the exact model, and fail clearly otherwise."""

import pytest
import torch

from unimoe.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    config_from_dict,
    config_to_dict,
    load_model,
    save_model_checkpoint,
)
from unimoe.model.config import AudioLMConfig
from unimoe.model.transformer import AudioLM


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_save_and_load_roundtrip(tmp_path, preset):
    torch.manual_seed(0)
    config = AudioLMConfig.from_preset(preset)
    assert config_from_dict(config_to_dict(config)) == config
    model = AudioLM(config)
    meta = CheckpointMetadata(config=config, codec={"name": "spectral_rvq", "path": "codec.pt"}, stage="joint")
    path = save_model_checkpoint(tmp_path / "m.ckpt", model, meta)
    loaded, loaded_meta = load_model(path)
    assert loaded_meta.stage == "joint" and loaded_meta.codec == meta.codec and loaded_meta.config == config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".*.tmp*"))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        load_model(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a unimoe checkpoint"):
        load_model(foreign)


def test_mismatched_weights_are_reported(tmp_path):
    config = AudioLMConfig.from_preset("tiny")
    meta = CheckpointMetadata(config=config.replace(num_layers=3))
    path = save_model_checkpoint(tmp_path / "m.ckpt", AudioLM(config), meta)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(path)
