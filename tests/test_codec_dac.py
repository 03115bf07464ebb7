"""``dac``: unimoe's own DAC network against transformers' ``DacModel`` (the independent reference).

A tiny random ``DacModel`` is saved twice: as a Hugging Face folder (``save_pretrained``) and
as an original descript-audio-codec ``weights.pth`` (keys renamed to the original
``nn.Sequential`` layout and weight norm split into ``weight_g`` / ``weight_v``, written here
from the structure of the upstream modules). Both must give transformers' codes and audio.
No real weights exist offline, so the released 16 kHz shapes are checked on the default
architecture built without memory (meta device), next to transformers' own.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from unimoe.audio import AudioFileError
from unimoe.codecs import CodecWeightsError, DacCodec
from unimoe.codecs.dac_model import DAC_VARIANTS, DacNetwork
from unimoe.registry import CODECS

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the DAC reference implementation")
from transformers import DacConfig, DacModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(encoder_hidden_size=4, downsampling_ratios=[2, 4, 5], decoder_hidden_size=32, n_codebooks=4,
            codebook_size=64, codebook_dim=4, sampling_rate=16000)
HOP = 2 * 4 * 5  # 40 samples per frame; the odd stride makes the decoder lose samples (4 * 2 = 8)


def _randomise(model: DacModel, seed: int = 0) -> DacModel:
    """Weights of a useful scale (transformers' init leaves an untrained model nearly constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
            elif "codebook" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                gain = 0.5 if name.startswith("decoder.") else 1.0  # O(1) activations: rounding stays small
                p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> DacModel:
    return _randomise(DacModel(DacConfig(**TINY)))


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dac_hf")
    reference.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}
    return folder


# ------------------------------------------------------------- original layout, written from upstream's modules
RESIDUAL = ("snake1", "conv1", "snake2", "conv2")  # upstream ResidualUnit.block: Snake1d, WNConv1d, Snake1d, WNConv1d


def _original_module_names(n_enc: int, n_dec: int) -> dict[str, str]:
    """transformers module path -> upstream path (Encoder.block / Decoder.model are nn.Sequential)."""
    names = {"encoder.conv1": "encoder.block.0", "encoder.snake1": f"encoder.block.{n_enc + 1}",
             "encoder.conv2": f"encoder.block.{n_enc + 2}", "decoder.conv1": "decoder.model.0",
             "decoder.snake1": f"decoder.model.{n_dec + 1}", "decoder.conv2": f"decoder.model.{n_dec + 2}"}
    for i in range(n_enc):  # EncoderBlock.block: ResidualUnit x 3, Snake1d, WNConv1d
        ours, theirs = f"encoder.block.{i}", f"encoder.block.{i + 1}.block"
        for j in range(3):
            for k, part in enumerate(RESIDUAL):
                names[f"{ours}.res_unit{j + 1}.{part}"] = f"{theirs}.{j}.block.{k}"
        names[f"{ours}.snake1"], names[f"{ours}.conv1"] = f"{theirs}.3", f"{theirs}.4"
    for i in range(n_dec):  # DecoderBlock.block: Snake1d, WNConvTranspose1d, ResidualUnit x 3
        ours, theirs = f"decoder.block.{i}", f"decoder.model.{i + 1}.block"
        names[f"{ours}.snake1"], names[f"{ours}.conv_t1"] = f"{theirs}.0", f"{theirs}.1"
        for j in range(3):
            for k, part in enumerate(RESIDUAL):
                names[f"{ours}.res_unit{j + 1}.{part}"] = f"{theirs}.{j + 2}.block.{k}"
    return names


def original_checkpoint(model: DacModel, seed: int = 1) -> dict:
    """``model`` as descript-audio-codec saves it: metadata.kwargs + weight-normed state dict.

    ``weight_v`` is the weight times a random positive factor per output slice, so a loader
    that ignored ``weight_g`` or the normalisation would get other weights.
    """
    cfg = model.config
    names = _original_module_names(len(cfg.downsampling_ratios), len(cfg.upsampling_ratios))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        module, param = key.rsplit(".", 1)
        target = names.get(module, module)  # quantizer keys are the same in both layouts
        assert key.startswith("quantizer.") or module in names, key
        if param == "weight" and "codebook" not in module:  # every conv is weight-normed upstream
            norm = value.flatten(1).norm(dim=1).view(-1, *([1] * (value.dim() - 1)))  # [out, 1, 1]
            scale = 0.5 + 1.5 * torch.rand(norm.shape, generator=g)
            state[f"{target}.weight_g"] = norm.clone()
            state[f"{target}.weight_v"] = value * scale
        else:
            state[f"{target}.{param}"] = value.clone()
    kwargs = {"encoder_dim": cfg.encoder_hidden_size, "encoder_rates": list(cfg.downsampling_ratios),
              "latent_dim": cfg.hidden_size, "decoder_dim": cfg.decoder_hidden_size,
              "decoder_rates": list(cfg.upsampling_ratios), "n_codebooks": cfg.n_codebooks,
              "codebook_size": cfg.codebook_size, "codebook_dim": cfg.codebook_dim, "quantizer_dropout": 0.5,
              "sample_rate": cfg.sampling_rate}
    return {"metadata": {"kwargs": kwargs}, "state_dict": state}


@pytest.fixture(scope="module")
def original_file(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dac_orig") / "weights_16khz.pth"
    torch.save(original_checkpoint(reference), path)
    return path


def _signal(samples: int, seed: int = 3) -> torch.Tensor:
    """A chirp and a noise burst: ``[2, 1, samples]``."""
    t = torch.arange(samples) / 16000
    chirp = 0.3 * torch.sin(2 * math.pi * (200 + 3000 * t) * t)
    noise = 0.2 * torch.randn(samples, generator=torch.Generator().manual_seed(seed))
    return torch.stack([chirp, noise]).unsqueeze(1)


def _reference_codes(model: DacModel, wav: torch.Tensor, n_quantizers: int | None = None) -> torch.Tensor:
    frames = -(-wav.shape[-1] // HOP)
    padded = torch.nn.functional.pad(wav, (0, frames * HOP - wav.shape[-1]))  # as upstream's preprocess
    with torch.no_grad():
        return model.encode(padded, n_quantizers=n_quantizers).audio_codes


def _reference_audio(model: DacModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(audio_codes=codes).audio_values  # [B, T * hop - 8]


# ------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_codes_and_audio_equal_transformers(layout, reference, hf_folder, original_file):
    codec = CODECS.build({"name": "dac", "path": str(hf_folder if layout == "hf" else original_file)})
    assert (codec.sample_rate, codec.hop_length, codec.num_codebooks, codec.cardinality) == (16000, HOP, 4, 64)
    wav = _signal(4000 + 17)  # not a whole number of frames
    codes = codec.encode(wav)
    expected = _reference_codes(reference, wav)
    assert codes.shape == (2, 4, -(-4017 // HOP)) == expected.shape and codes.dtype == torch.long
    assert torch.equal(codes, expected)
    assert all(len(codes[b, c].unique()) > 20 for b in range(2) for c in range(4))  # codes follow the input

    audio = codec.decode(codes)
    ref_audio = _reference_audio(reference, expected)
    assert audio.shape == (2, 1, codes.shape[-1] * HOP) and ref_audio.shape[-1] == codes.shape[-1] * HOP - 8
    tol = 0.0 if layout == "hf" else 1e-5  # the original layout re-normalises weight_v: rounding only
    torch.testing.assert_close(audio[:, 0, : ref_audio.shape[-1]], ref_audio, rtol=0, atol=tol)
    assert torch.equal(audio[..., ref_audio.shape[-1]:], torch.zeros(2, 1, 8))  # padded to T * hop


def test_fewer_quantizers_are_a_prefix_and_match_transformers(reference, hf_folder):
    full = CODECS.build({"name": "dac", "path": str(hf_folder)})
    two = CODECS.build({"name": "dac", "path": str(hf_folder), "n_quantizers": 2})
    assert two.num_codebooks == 2 and two.describe()["codebooks_available"] == 4
    wav = _signal(2000)
    codes = two.encode(wav)
    assert torch.equal(codes, _reference_codes(reference, wav, n_quantizers=2))
    assert torch.equal(codes, full.encode(wav)[:, :2])  # residual quantisation: a prefix of the full codes
    ref_audio = _reference_audio(reference, codes)
    torch.testing.assert_close(two.decode(codes)[:, 0, : ref_audio.shape[-1]], ref_audio, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[B, 2, T\]"):
        two.decode(full.encode(wav))
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match=r"n_quantizers must be an integer in \[1, 4\]"):
            DacCodec(path=str(hf_folder), n_quantizers=bad)


def test_weight_norm_parametrisation_folder_loads(reference, tmp_path):
    """A folder saved from a weight-normed DacModel (``parametrizations`` or ``weight_g`` keys) still matches."""
    model = _randomise(DacModel(DacConfig(**TINY)))
    model.apply_weight_norm()
    directions = [p for name, p in model.named_parameters() if name.endswith(("original1", "weight_v"))]
    assert len(directions) > 20
    with torch.no_grad():  # change the direction's scale: only g * v / |v| may matter
        for p in directions:
            p.mul_(3.0)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "model.safetensors")
    assert any(k.endswith(("weight_g", "original0")) for k in keys)  # really saved weight-normed
    codec = DacCodec(path=str(tmp_path))
    wav = _signal(1600)
    assert torch.equal(codec.encode(wav), _reference_codes(model, wav))
    codes = codec.encode(wav)
    ref_audio = _reference_audio(model, codes)
    torch.testing.assert_close(codec.decode(codes)[:, 0, : ref_audio.shape[-1]], ref_audio, rtol=0, atol=1e-5)


def test_sharded_folder_loads(reference, tmp_path):
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    wav = _signal(1200)
    assert torch.equal(DacCodec(path=str(tmp_path)).encode(wav), _reference_codes(reference, wav))


# ------------------------------------------------------------------------------------- release shapes
RELEASES = {  # the released models: sample rate, hop, frames/s, codebooks (descript conf/final/*.yml)
    "16khz": (16000, 320, 50.0, 12, [2, 4, 5, 8]),
    "24khz": (24000, 320, 75.0, 32, [2, 4, 5, 8]),
    "44khz": (44100, 512, 44100 / 512, 9, [2, 4, 8, 8]),
}


@pytest.mark.parametrize("variant", list(RELEASES))
def test_release_architectures_match_transformers_shapes(variant):
    sample_rate, hop, fps, n_codebooks, rates = RELEASES[variant]
    arch = DAC_VARIANTS[variant]
    assert (arch.sample_rate, arch.hop_length, arch.sample_rate / arch.hop_length) == (sample_rate, hop, fps)
    assert (arch.n_codebooks, arch.codebook_size, arch.codebook_dims[0], arch.latent_channels) == (n_codebooks, 1024, 8, 1024)
    config = DacConfig(encoder_hidden_size=64, downsampling_ratios=rates, decoder_hidden_size=1536,
                       n_codebooks=n_codebooks, codebook_size=1024, codebook_dim=8, sampling_rate=sample_rate)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DacNetwork(arch).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in DacModel(config).state_dict().items()}
    assert ours == theirs
    assert config.hop_length == hop


def test_default_is_the_release_16khz_with_12_codebooks():
    codec = CODECS.build({"name": "dac", "pretrained": False})  # the real 16 kHz architecture, untrained
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate) == (16000, 320, 50.0)
    assert (codec.num_codebooks, codec.cardinality) == (12, 1024)
    assert codec.describe() == {"codec": "DacCodec", "sample_rate": 16000, "hop_length": 320, "frame_rate": 50.0,
                                "num_codebooks": 12, "cardinality": 1024, "variant": "16khz",
                                "codebooks_available": 12, "pretrained": False}
    params = sum(p.numel() for p in codec.parameters())
    with torch.device("meta"):
        reference_params = sum(p.numel() for p in DacModel(DacConfig(
            downsampling_ratios=[2, 4, 5, 8], n_codebooks=12, sampling_rate=16000)).parameters())
    assert params == reference_params
    wav = _signal(3200)
    codes = codec.encode(wav)
    assert codes.shape == (2, 12, 10) and 0 <= codes.min() and codes.max() < 1024
    assert not torch.equal(codes[0], codes[1])  # untrained, yet the codes follow the input
    assert torch.equal(codes, DacCodec(pretrained=False, seed=0).encode(wav))  # seeded: reproducible
    assert codec.decode(codes[:, :, :3]).shape == (2, 1, 960)


def test_variant_and_argument_errors(hf_folder):
    with pytest.raises(ValueError, match="variant 24khz works at 24000 Hz but .*model.safetensors holds a 16000 Hz"):
        DacCodec(variant="24khz", path=str(hf_folder))
    assert DacCodec(variant="16khz", path=str(hf_folder)).variant == "custom"  # tiny: not the release architecture
    with pytest.raises(ValueError, match="unknown variant '8khz'.*16khz, 24khz, 44khz, 44.1khz"):
        DacCodec(variant="8khz", pretrained=False)
    with pytest.raises(ValueError, match="pretrained: false"):
        DacCodec(path=str(hf_folder), pretrained=False)
    assert DacCodec(variant="44.1khz", pretrained=False, n_quantizers=1).describe()["sample_rate"] == 44100


# ------------------------------------------------------------------------------------- sample rates / files
def test_other_sample_rates_are_resampled(hf_folder, tmp_path):
    codec = DacCodec(path=str(hf_folder))
    t = np.arange(int(0.25 * 44100)) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    expected_frames = -(-round(0.25 * 16000) // HOP)
    codes = codec.encode_audio(torch.from_numpy(tone), 44100)
    resampled = AF.resample(torch.from_numpy(tone).view(1, -1), 44100, 16000)  # independent resampling
    assert codes.shape == (4, expected_frames)
    assert torch.equal(codes, codec.encode(resampled.view(1, 1, -1))[0])
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone, tone], axis=1), 44100, subtype="FLOAT")
    assert torch.equal(codec.encode_file(path), codes)  # mixed down + resampled the same way
    with pytest.raises(ValueError, match=r"mono batch \[B, 1, S\]"):
        codec.encode(torch.zeros(1, 2, 400))
    with pytest.raises(AudioFileError, match="absent.wav"):
        codec.encode_file(tmp_path / "absent.wav")


# ------------------------------------------------------------------------------------- bad weights
def test_missing_and_corrupt_weights_name_the_file(hf_folder, original_file, tmp_path):
    with pytest.raises(CodecWeightsError, match="path .*nowhere does not exist.*hf download descript/dac_16khz"):
        DacCodec(path=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hi")
    with pytest.raises(CodecWeightsError, match="has neither model.safetensors.*holds: README.md"):
        DacCodec(path=str(empty))

    truncated = tmp_path / "trunc"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes()[:500])
    with pytest.raises(CodecWeightsError, match=r"cannot read DAC weights .*trunc/model.safetensors"):
        DacCodec(path=str(truncated))
    (truncated / "config.json").write_text("{not json")
    with pytest.raises(CodecWeightsError, match=r"cannot read .*trunc/config.json: not valid JSON"):
        DacCodec(path=str(truncated))
    (truncated / "config.json").unlink()
    with pytest.raises(CodecWeightsError, match=r"trunc/model.safetensors: .*trunc is not a model folder: it has no config.json"):
        DacCodec(path=str(truncated / "model.safetensors"))
    (truncated / "config.json").write_text(json.dumps({"model_type": "encodec"}))
    with pytest.raises(CodecWeightsError, match="describes a 'encodec' model, not DAC"):
        DacCodec(path=str(truncated))

    cut = tmp_path / "cut.pth"
    cut.write_bytes(original_file.read_bytes()[:1000])
    with pytest.raises(CodecWeightsError, match=r"cannot read DAC weights .*cut.pth"):
        DacCodec(path=str(cut))
    plain = tmp_path / "plain.pth"
    torch.save({"encoder.weight": torch.zeros(1)}, plain)
    with pytest.raises(CodecWeightsError, match=r"plain.pth is not a descript-audio-codec weights file"):
        DacCodec(path=str(plain))

    checkpoint = torch.load(original_file, weights_only=True)
    del checkpoint["state_dict"]["decoder.model.0.bias"]
    checkpoint["state_dict"]["encoder.block.0.bias"] = torch.zeros(3)
    broken = tmp_path / "broken.pth"
    torch.save(checkpoint, broken)
    with pytest.raises(CodecWeightsError, match=r"broken.pth do not match.*1 missing \(e.g. decoder.conv1.bias\), "
                       r"1 of the wrong shape \(e.g. encoder.conv1.bias \(3,\) \(architecture wants \(4,\)\)\)"):
        DacCodec(path=str(broken))
    v = checkpoint["state_dict"]["encoder.block.0.weight_v"]
    checkpoint["state_dict"]["encoder.block.0.weight_v"] = v[:2]
    torch.save(checkpoint, broken)
    with pytest.raises(CodecWeightsError, match=r"broken.pth: weight-norm magnitude encoder.conv1.weight_g \(4, 1, 1\) does not fit"):
        DacCodec(path=str(broken))
    checkpoint["state_dict"]["encoder.block.0.weight_v"] = v
    checkpoint["state_dict"]["encoder.block.9.weight"] = v
    torch.save(checkpoint, broken)
    with pytest.raises(CodecWeightsError, match=r"broken.pth: unexpected key 'encoder.block.9.weight'"):
        DacCodec(path=str(broken))
    checkpoint["metadata"] = {}
    torch.save(checkpoint, broken)
    with pytest.raises(CodecWeightsError, match="broken.pth have no metadata.kwargs"):
        DacCodec(path=str(broken))


class _Payload:
    """Unpickling this would create a file: the proof that code from a weights file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_with_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    torch.save({"metadata": {"kwargs": {}}, "state_dict": {}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(CodecWeightsError, match="weights.pth hold Python objects a safe load refuses"):
        DacCodec(path=str(tmp_path))  # the folder's single .pth is found and refused
    assert not marker.exists()


# ------------------------------------------------------------------------------------- no path: cache, hub
def _no_hub(*args, **kwargs):
    raise OSError("network is unreachable (mocked)")


def test_offline_without_path_says_what_to_download(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HOME", str(tmp_path))  # no descript-audio-codec cache file
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    with pytest.raises(CodecWeightsError) as err:
        DacCodec()
    msg = str(err.value)
    assert "descript/dac_16khz" in msg and "mocked" in msg and "model.safetensors" in msg and "config.json" in msg
    assert "releases/download/0.0.5/weights_16khz.pth" in msg and "path" in msg and "pretrained: false" in msg
    assert str(tmp_path / ".cache/descript/dac/weights_16khz_8kbps_0.0.5.pth") in msg
    with pytest.raises(CodecWeightsError, match="descript/dac_44khz"):
        DacCodec(variant="44khz")


def test_hub_snapshot_and_descript_cache_are_used_without_a_path(monkeypatch, tmp_path, hf_folder, original_file, reference):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []

    def snapshot(repo_id, allow_patterns):
        calls.append((repo_id, sorted(allow_patterns)))
        return str(hf_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    wav = _signal(800)
    assert torch.equal(DacCodec(variant="16khz").encode(wav), _reference_codes(reference, wav))
    assert calls == [("descript/dac_16khz", ["config.json", "model.safetensors"])]

    cache = tmp_path / ".cache" / "descript" / "dac" / "weights_16khz_8kbps_0.0.5.pth"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(original_file.read_bytes())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    assert torch.equal(DacCodec().encode(wav), _reference_codes(reference, wav))  # the cache file, no hub


# ------------------------------------------------------------------------------------- command lines
def _write_clip(path: Path, seconds: float, sr: int, seed: int) -> None:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    wav = 0.3 * np.sin(2 * np.pi * (150 + 100 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    sf.write(path, wav.astype(np.float32), sr)


def test_codec_roundtrip_command(hf_folder, original_file, tmp_path, capsys):
    from unimoe.cli import main

    clip = tmp_path / "clip.wav"
    _write_clip(clip, 0.5, 22050, 0)
    out = tmp_path / "decoded.wav"
    spec = json.dumps({"name": "dac", "path": str(hf_folder)})
    assert main(["codec", "roundtrip", "--codec", spec, "--in", str(clip), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["codec"]["codec"] == "DacCodec" and report["codec"]["num_codebooks"] == 4
    assert report["num_frames"] == -(-8000 // HOP)
    assert report["bitrate_kbps"] == pytest.approx(4 * 6 * 400 / 1000)
    info = sf.info(str(out))
    assert (info.samplerate, info.frames, info.channels) == (16000, 8000, 1)

    assert main(["codec", "roundtrip", "--codec", "{name: dac, path: /nowhere/dac}", "--in", str(clip), "--out", str(out)]) == 1
    assert "/nowhere/dac does not exist" in capsys.readouterr().err
    assert main(["codec", "roundtrip", "--codec", str(original_file), "--in", str(clip), "--out", str(out)]) == 1
    assert "looks like descript-audio-codec weights: use --codec '{name: dac" in capsys.readouterr().err


def test_tokenize_command_with_a_local_dac(hf_folder, original_file, tmp_path, capsys):
    from unimoe.cli import main
    from unimoe.data.manifest import ManifestEntry, write_manifest
    from unimoe.data.index import open_index
    from unimoe.data.shards import load_shard

    entries = []
    for i in range(3):
        _write_clip(tmp_path / f"m{i}.wav", 0.4 + 0.1 * i, 24000, i)
        entries.append(ManifestEntry(id=f"m{i}", task="t2m", audio=str(tmp_path / f"m{i}.wav"), text=f"tone {i}"))
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, entries)
    spec = f"{{name: dac, path: {original_file}}}"
    argv = ["tokenize", "--manifest", str(manifest), "--codec", spec, "--out", str(tmp_path / "shards"), "--workers", "1", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    codec = DacCodec(path=str(original_file))
    index = open_index(tmp_path / "shards")
    assert index.codec["num_codebooks"] == 4 and len(index) == 3
    items = {it["id"]: it for p in sorted((tmp_path / "shards").glob("shard-*.pt")) for it in load_shard(p)["items"]}
    for i in range(3):
        assert torch.equal(items[f"m{i}"]["codes"].long(), codec.encode_file(tmp_path / f"m{i}.wav"))

    bad = ["tokenize", "--manifest", str(manifest), "--codec", "{name: dac, path: /nowhere/w.pth}", "--out", str(tmp_path / "o2")]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "unimoe tokenize: error:" in err and "/nowhere/w.pth does not exist" in err
