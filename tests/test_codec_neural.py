"""``encodec`` and ``vocos``: untrained round trips, file handling and the weight rules.

No weights are reachable here, so the pretrained path is tested two ways: loading from a
local checkpoint written from an untrained model (the same architecture as the release),
and the offline error with the download mocked to fail.
"""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import soundfile as sf
import torch

import unimoe.codecs.weights as weights
from unimoe.audio import AudioFileError
from unimoe.codecs import CodecWeightsError, EncodecCodec, VocosCodec
from unimoe.registry import CODECS

pytestmark = pytest.mark.usefixtures("single_thread")




@pytest.fixture(scope="module")
def encodec() -> EncodecCodec:
    return CODECS.build({"name": "encodec", "bandwidth": 3.0, "pretrained": False})


@pytest.fixture(scope="module")
def vocos(encodec) -> VocosCodec:
    return CODECS.build({"name": "vocos", "bandwidth": 3.0, "pretrained": False})


def _tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return np.stack([mono, 0.5 * mono][:channels], axis=1).astype(np.float32)  # [S, channels]


@pytest.mark.parametrize("samples", [24000, 24000 + 17, 319, 1])
def test_encodec_round_trip_shapes(encodec, samples):
    wav = torch.randn(2, 1, samples, generator=torch.Generator().manual_seed(0)) * 0.1
    codes = encodec.encode(wav)
    frames = -(-samples // 320)  # ceil, computed independently of the codec
    assert codes.shape == (2, 4, frames) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 1024
    out = encodec.decode(codes)
    assert out.shape == (2, 1, frames * 320) and torch.isfinite(out).all()


def test_encodec_numbers_and_bandwidths(encodec):
    assert (encodec.sample_rate, encodec.hop_length, encodec.frame_rate, encodec.cardinality) == (24000, 320, 75.0, 1024)
    assert encodec.describe()["num_codebooks"] == 4
    expected = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # 0.75 kbps per 10-bit codebook at 75 Hz
    for bw, n in expected.items():
        assert n * 10 * 75 / 1000 == bw
    with pytest.raises(ValueError, match="unsupported bandwidth 5.0.*1.5 \\(2 codebooks\\)"):
        EncodecCodec(bandwidth=5.0, pretrained=False)
    with pytest.raises(ValueError, match="vocos: unsupported bandwidth 24"):
        VocosCodec(bandwidth=24.0, pretrained=False)


def test_untrained_codes_depend_on_the_input(encodec):
    """Random codebooks (not the package's all-zero placeholders) give informative codes."""
    t = torch.arange(24000) / 24000
    quiet = (0.01 * torch.sin(2 * torch.pi * 100 * t)).view(1, 1, -1)
    loud = torch.randn(1, 1, 24000, generator=torch.Generator().manual_seed(1)) * 0.5
    a, b = encodec.encode(quiet), encodec.encode(loud)
    assert not torch.equal(a, b)
    assert torch.equal(a, encodec.encode(quiet))  # deterministic
    same_seed = EncodecCodec(bandwidth=3.0, pretrained=False, seed=0)
    assert torch.equal(same_seed.encode(loud), b)


def test_vocos_uses_encodec_tokens_and_decodes_to_exact_length(encodec, vocos):
    wav = torch.randn(1, 1, 8000, generator=torch.Generator().manual_seed(2)) * 0.1
    codes = vocos.encode(wav)
    assert torch.equal(codes, encodec.encode(wav))  # same architecture, same seed, same tokens
    assert vocos.bandwidth_id == 1  # 3 kbps is Vocos' second AdaLN embedding
    out = vocos.decode(codes)
    assert out.shape == (1, 1, codes.shape[-1] * 320) and torch.isfinite(out).all()
    # codebook table is the tokenizer's own: features are sums of the chosen EnCodec codewords
    feats = vocos.vocos.codes_to_features(codes.transpose(0, 1))  # [1, 128, T]
    layers = encodec.model.quantizer.vq.layers
    manual = sum(layers[c].codebook[codes[0, c]] for c in range(codes.shape[1]))  # [T, 128]
    torch.testing.assert_close(feats[0].T, manual)


def test_decode_rejects_bad_codes(encodec):
    with pytest.raises(ValueError, match=r"\[B, 4, T\]"):
        encodec.decode(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1024\).*1026"):
        encodec.decode(torch.full((1, 4, 5), 1026))
    with pytest.raises(ValueError, match="empty"):
        encodec.encode(torch.zeros(1, 1, 0))


def test_encode_file_resamples_and_mixes_down(encodec, tmp_path):
    path = tmp_path / "stereo44k.wav"
    sf.write(path, _tone(0.5, 44100, channels=2), 44100, subtype="FLOAT")
    codes = encodec.encode_file(path)
    assert codes.shape == (4, -(-12000 // 320))  # 0.5 s at 24 kHz
    mono24 = torch.from_numpy(_tone(0.5, 24000)[:, 0]) * 0.75  # mean of the two channels
    in_memory = encodec.encode_audio(torch.from_numpy(_tone(0.5, 44100, 2).T), 44100)
    assert torch.equal(codes, in_memory)
    direct = encodec.encode(mono24.view(1, 1, -1))[0]
    assert (codes == direct).float().mean() > 0.5  # resampled tone ~ native tone


def test_encode_file_errors_name_the_file(encodec, tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioFileError, match="nope.wav"):
        encodec.encode_file(missing)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    with pytest.raises(AudioFileError, match="corrupt.wav"):
        encodec.encode_file(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), dtype=np.float32), 24000)
    with pytest.raises(AudioFileError, match="empty.wav"):
        encodec.encode_file(empty)


# ---------------------------------------------------------------------------------- weights
def _fail_download(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable (mocked)")


def test_offline_encodec_without_path_explains_how_to_get_weights(monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fail_download)
    with pytest.raises(CodecWeightsError) as err:
        EncodecCodec(bandwidth=6.0)
    msg = str(err.value)
    assert "encodec_24khz-d7cc33bc.th" in msg and "dl.fbaipublicfiles.com" in msg
    assert "path" in msg and "pretrained: false" in msg and "mocked" in msg


def test_offline_vocos_without_path_explains_how_to_get_weights(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fail_download)
    enc = tmp_path / "enc.th"
    torch.save(EncodecCodec(pretrained=False).model.state_dict(), enc)
    with pytest.raises(CodecWeightsError) as err:
        VocosCodec(bandwidth=6.0, encodec_path=str(enc))
    msg = str(err.value)
    assert "charactr/vocos-encodec-24khz" in msg and "pytorch_model.bin" in msg
    assert "encodec_path" in msg and "pretrained: false" in msg


def test_encodec_loads_a_local_checkpoint_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fail_download)  # must not be needed
    source = EncodecCodec(bandwidth=6.0, pretrained=False, seed=5)
    ckpt = tmp_path / "my_encodec.th"
    torch.save(source.model.state_dict(), ckpt)
    loaded = EncodecCodec(bandwidth=6.0, path=str(ckpt))
    wav = torch.randn(1, 1, 4000, generator=torch.Generator().manual_seed(3)) * 0.2
    assert torch.equal(loaded.encode(wav), source.encode(wav))
    # a folder is searched for the release file name; a wrong hash is caught as corruption
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(CodecWeightsError, match="has no encodec_24khz-d7cc33bc.th"):
        EncodecCodec(path=str(folder))
    (folder / weights.ENCODEC_24KHZ_FILE).write_bytes(ckpt.read_bytes())
    with pytest.raises(CodecWeightsError, match="corrupt or incomplete"):
        EncodecCodec(path=str(folder))
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CodecWeightsError, match="garbage.th"):
        EncodecCodec(path=str(garbage))
    with pytest.raises(CodecWeightsError, match="does not exist"):
        EncodecCodec(path=str(tmp_path / "missing"))


def test_vocos_loads_a_local_snapshot_folder(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fail_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fail_download)
    source = VocosCodec(bandwidth=6.0, pretrained=False, seed=9)
    snapshot = tmp_path / "vocos-encodec-24khz"
    snapshot.mkdir()
    # the release file holds everything except EnCodec's own weights
    state = {k: v for k, v in source.vocos.state_dict().items() if not k.startswith("feature_extractor.encodec.")}
    torch.save(state, snapshot / weights.VOCOS_WEIGHTS_FILE)
    torch.save(source.tokenizer.model.state_dict(), tmp_path / "enc.th")
    loaded = VocosCodec(bandwidth=6.0, path=str(snapshot), encodec_path=str(tmp_path / "enc.th"))
    codes = torch.randint(0, 1024, (1, 8, 20), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.decode(codes), source.decode(codes))
    # a file of the wrong architecture is a clear error, not a silent partial load
    torch.save({"backbone.embed.weight": torch.zeros(3)}, snapshot / weights.VOCOS_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="do not match"):
        VocosCodec(bandwidth=6.0, path=str(snapshot), encodec_path=str(tmp_path / "enc.th"))
