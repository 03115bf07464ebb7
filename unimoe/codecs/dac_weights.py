"""Reading DAC weights: the original ``weights.pth``, a Hugging Face ``DacModel`` folder, or the hub.

Two layouts exist for the same network:

* **original** (descript-audio-codec releases, e.g. ``weights_16khz.pth``): one ``torch.save``
  of ``{"metadata": {"kwargs": {sample_rate, encoder_dim, encoder_rates, ...}}, "state_dict":
  {...}}`` with ``nn.Sequential`` key names (``encoder.block.1.block.0.block.1.weight_g``) and
  weight norm stored as ``weight_g`` / ``weight_v``. It is read with
  ``torch.load(weights_only=True)``: plain tensors, dicts, lists and numbers, never code.
* **Hugging Face** (``descript/dac_16khz``): ``config.json`` + ``model.safetensors`` (or a
  sharded ``model.safetensors.index.json``) with the module names :mod:`unimoe.codecs.dac_model` uses.

Both come out as ``(DacArchitecture, state dict in DacNetwork names)`` with weight norm folded
into plain weights. Without a path the weights come from descript-audio-codec's own cache
file if present, else the Hugging Face hub (its cache, then a download); every failure is a
:class:`CodecWeightsError` naming the file and saying what to fetch and where to put it.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from unimoe.codecs.dac_model import DAC_VARIANTS, DacArchitecture, DacNetwork
from unimoe.codecs.weights import CodecWeightsError
from unimoe.state_dicts import shape_differences

__all__ = [
    "DacRelease",
    "DAC_RELEASES",
    "load_dac_checkpoint",
    "locate_dac_weights",
    "original_to_network_key",
    "fold_weight_norm",
    "build_dac_network",
]


@dataclass(frozen=True)
class DacRelease:
    """Where one released DAC variant lives: the hub repo and the original release file."""

    hub_repo: str
    url: str
    tag: str

    @property
    def cache_file(self) -> Path:
        """The file descript-audio-codec's ``dac.utils.download`` writes (``~/.cache/descript/dac/``)."""
        variant = self.hub_repo.rsplit("_", 1)[-1]
        return Path.home() / ".cache" / "descript" / "dac" / f"weights_{variant}_8kbps_{self.tag}.pth"


_RELEASE_URL = "https://github.com/descriptinc/descript-audio-codec/releases/download/"
DAC_RELEASES: dict[str, DacRelease] = {
    "16khz": DacRelease("descript/dac_16khz", _RELEASE_URL + "0.0.5/weights_16khz.pth", "0.0.5"),
    "24khz": DacRelease("descript/dac_24khz", _RELEASE_URL + "0.0.4/weights_24khz.pth", "0.0.4"),
    "44khz": DacRelease("descript/dac_44khz", _RELEASE_URL + "0.0.1/weights.pth", "0.0.1"),
}
HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
HF_INDEX_FILE = HF_WEIGHTS_FILE + ".index.json"  # sharded save_pretrained (not needed at DAC's size, but valid)


def weights_hint(variant: str) -> str:
    """How to get ``variant``'s weights onto an offline machine and name them."""
    release = DAC_RELEASES[variant]
    folder = release.hub_repo.split("/")[-1]
    return (
        f"On a machine with internet, fetch either the Hugging Face folder "
        f"(`hf download {release.hub_repo} {HF_CONFIG_FILE} {HF_WEIGHTS_FILE} --local-dir /models/{folder}`) "
        f"or the original release file ({release.url}), copy it to this machine and pass the folder or file "
        f"as the codec's `path` (YAML: `codec: {{name: dac, variant: {variant}, path: /models/{folder}}}`), "
        f"or put the original file at {release.cache_file}, where descript-audio-codec caches it. "
        "For tests without weights use `pretrained: false` (untrained architecture)."
    )


# ----------------------------------------------------------------------------- locating
def locate_dac_weights(variant: str, download: Callable[..., Any] | None = None) -> Path:
    """No path given: descript-audio-codec's cache file, else the hub snapshot (cache or download)."""
    release = DAC_RELEASES[variant]
    if release.cache_file.is_file():
        return release.cache_file
    what = f"DAC {variant}"
    if download is None:
        try:
            from huggingface_hub import snapshot_download as download
        except ImportError as exc:
            raise CodecWeightsError(
                f"{what} weights: no local path was given and huggingface_hub is not installed "
                f"(`pip install huggingface_hub` to download {release.hub_repo}). {weights_hint(variant)}"
            ) from exc
    try:
        folder = download(repo_id=release.hub_repo, allow_patterns=[HF_CONFIG_FILE, HF_WEIGHTS_FILE])
    except Exception as exc:  # offline, hub error, missing cache: all mean "no weights"
        raise CodecWeightsError(
            f"{what} weights are not available: no local path was given and downloading {release.hub_repo} "
            f"from the Hugging Face hub failed ({type(exc).__name__}: {exc}). {weights_hint(variant)}"
        ) from exc
    return Path(folder)


@dataclass(frozen=True)
class _Source:
    layout: str  # "original" | "hf"
    weights: Path
    config: Path | None = None


def _resolve(path: Path, hint: str) -> _Source:
    """Which file holds the weights and in which layout; a clear error when nothing fits."""
    if path.is_file():
        if path.name.endswith((".safetensors", HF_INDEX_FILE)):
            return _Source("hf", path, path.parent / HF_CONFIG_FILE)
        return _Source("original", path)
    if not path.is_dir():
        raise CodecWeightsError(f"DAC weights: path {path} does not exist. {hint}")
    for name in (HF_WEIGHTS_FILE, HF_INDEX_FILE):
        if (path / name).is_file():
            return _Source("hf", path / name, path / HF_CONFIG_FILE)
    checkpoints = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())
    if len(checkpoints) == 1:
        return _Source("original", checkpoints[0])
    present = sorted(p.name for p in path.iterdir())[:20]
    if checkpoints:
        raise CodecWeightsError(
            f"DAC weights: folder {path} holds several checkpoints ({', '.join(p.name for p in checkpoints)}); "
            "pass the one you mean as `path`."
        )
    raise CodecWeightsError(
        f"DAC weights: folder {path} has neither {HF_WEIGHTS_FILE} (+ {HF_CONFIG_FILE}) nor an original "
        f"weights .pth file (it holds: {', '.join(present) or 'nothing'}). {hint}"
    )


# ----------------------------------------------------------------------------- reading
def load_dac_checkpoint(path: str | Path, hint: str = "") -> tuple[DacArchitecture, dict[str, torch.Tensor], Path]:
    """``path`` (file or folder, either layout) -> architecture, DacNetwork state dict, weights file."""
    source = _resolve(Path(path).expanduser(), hint)
    if source.layout == "hf":
        arch, state = _read_hf(source)
    else:
        arch, state = _read_original(source.weights)
    return arch, fold_weight_norm(state, source.weights), source.weights


def _read_original(file: Path) -> tuple[DacArchitecture, dict[str, torch.Tensor]]:
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CodecWeightsError(
            f"DAC weights {file} hold Python objects a safe load refuses, so unimoe will not open it "
            f"(loading it would run code from the file): {exc}. If you trust the file, re-save it where "
            "descript-audio-codec is installed as plain data (`torch.save({'metadata': {'kwargs': m.metadata"
            "['kwargs']}, 'state_dict': m.state_dict()}, path)`) or convert it to a Hugging Face folder."
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file, ...: torch raises several types
        raise CodecWeightsError(f"cannot read DAC weights {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        keys = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CodecWeightsError(
            f"{file} is not a descript-audio-codec weights file: expected a dict with 'metadata' and "
            f"'state_dict', found {keys}"
        )
    metadata = payload.get("metadata")
    kwargs = metadata.get("kwargs") if isinstance(metadata, dict) else None
    if not isinstance(kwargs, dict):
        raise CodecWeightsError(f"DAC weights {file} have no metadata.kwargs (the architecture the weights belong to)")
    arch = _architecture(file, _ORIGINAL_FIELDS, kwargs)
    state = payload["state_dict"]
    renamed = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CodecWeightsError(f"DAC weights {file}: state_dict entry {key!r} is not a tensor")
        new = original_to_network_key(key, len(arch.encoder_rates), len(arch.decoder_rates))
        if new is None:
            raise CodecWeightsError(f"DAC weights {file}: unexpected key {key!r} in the original layout")
        renamed[new] = value
    return arch, renamed


def _read_hf(source: _Source) -> tuple[DacArchitecture, dict[str, torch.Tensor]]:
    from unimoe.checkpoint import CheckpointError, read_folder_config
    from unimoe.safetensors_io import SafetensorsTensors

    config_file = source.config
    assert config_file is not None and config_file.name == HF_CONFIG_FILE
    try:
        config = read_folder_config(config_file.parent)
    except CheckpointError as exc:
        raise CodecWeightsError(f"DAC weights {source.weights}: {exc}") from exc
    if config.get("model_type", "dac") != "dac":
        raise CodecWeightsError(f"{config_file} describes a {config['model_type']!r} model, not DAC (model_type 'dac')")
    if "downsampling_ratios" in config and "upsampling_ratios" not in config:
        config = {**config, "upsampling_ratios": list(config["downsampling_ratios"])[::-1]}
    arch = _architecture(config_file, _HF_FIELDS, config)
    try:
        tensors = SafetensorsTensors.open(source.weights)  # one file or a shard index
        return arch, {key: tensors[key] for key in tensors}
    except CheckpointError as exc:
        raise CodecWeightsError(f"cannot read DAC weights {source.weights}: {exc}") from exc


# field in DacArchitecture -> (key in the file, default when absent: the upstream class default)
_ORIGINAL_FIELDS = {
    "sample_rate": ("sample_rate", 44_100),
    "encoder_dim": ("encoder_dim", 64),
    "encoder_rates": ("encoder_rates", (2, 4, 8, 8)),
    "decoder_dim": ("decoder_dim", 1536),
    "decoder_rates": ("decoder_rates", (8, 8, 4, 2)),
    "n_codebooks": ("n_codebooks", 9),
    "codebook_size": ("codebook_size", 1024),
    "codebook_dim": ("codebook_dim", 8),
    "latent_dim": ("latent_dim", None),
}
_HF_FIELDS = {
    "sample_rate": ("sampling_rate", 16_000),
    "encoder_dim": ("encoder_hidden_size", 64),
    "encoder_rates": ("downsampling_ratios", (2, 4, 8, 8)),
    "decoder_dim": ("decoder_hidden_size", 1536),
    "decoder_rates": ("upsampling_ratios", (8, 8, 4, 2)),
    "n_codebooks": ("n_codebooks", 9),
    "codebook_size": ("codebook_size", 1024),
    "codebook_dim": ("codebook_dim", 8),
    "latent_dim": ("hidden_size", None),
}


def _architecture(file: Path, fields: dict[str, tuple[str, Any]], values: dict[str, Any]) -> DacArchitecture:
    args = {}
    for name, (key, default) in fields.items():
        value = values.get(key, default)
        args[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    try:
        arch = DacArchitecture(**args)
    except (TypeError, ValueError) as exc:
        raise CodecWeightsError(f"DAC weights {file}: {exc}") from exc
    # Files spell derived values out (latent size, one codebook_dim per codebook); store the
    # canonical form so a release file compares equal to its DAC_VARIANTS entry.
    if arch.latent_dim == arch.encoder_dim * 2 ** len(arch.encoder_rates):
        arch = dataclasses.replace(arch, latent_dim=None)
    if isinstance(arch.codebook_dim, tuple) and len(set(arch.codebook_dim)) == 1:
        arch = dataclasses.replace(arch, codebook_dim=arch.codebook_dim[0])
    return arch


# ----------------------------------------------------------------------------- renaming
_RESIDUAL_PARTS = ("snake1", "conv1", "snake2", "conv2")  # ResidualUnit.block = Snake, conv, Snake, conv


def _residual(rest: str) -> str | None:
    match = re.fullmatch(r"block\.([0-3])\.(.+)", rest)
    return f"{_RESIDUAL_PARTS[int(match.group(1))]}.{match.group(2)}" if match else None


def original_to_network_key(key: str, n_encoder_blocks: int, n_decoder_blocks: int) -> str | None:
    """An original ``weights.pth`` key -> the DacNetwork key (``None`` if it is not part of the network).

    ``encoder.block`` = [conv, EncoderBlock x n, Snake, conv]; an EncoderBlock's ``block`` =
    [ResidualUnit x 3, Snake, strided conv]. ``decoder.model`` = [conv, DecoderBlock x n, Snake,
    conv, Tanh]; a DecoderBlock's ``block`` = [Snake, transposed conv, ResidualUnit x 3].
    """
    if key.startswith("quantizer.quantizers."):
        return key
    match = re.fullmatch(r"(encoder\.block|decoder\.model)\.(\d+)\.(.+)", key)
    if match is None:
        return None
    side, index, rest = match.group(1).split(".")[0], int(match.group(2)), match.group(3)
    blocks = n_encoder_blocks if side == "encoder" else n_decoder_blocks
    if index == 0:
        return f"{side}.conv1.{rest}"
    if index == blocks + 1:
        return f"{side}.snake1.{rest}"
    if index == blocks + 2:
        return f"{side}.conv2.{rest}"
    if not 1 <= index <= blocks:
        return None
    inner = re.fullmatch(r"block\.(\d+)\.(.+)", rest)
    if inner is None:
        return None
    part, rest = int(inner.group(1)), inner.group(2)
    prefix = f"{side}.block.{index - 1}"
    if side == "encoder":
        named = {3: "snake1", 4: "conv1"}
        residual_units = range(0, 3)
        unit_name = lambda p: f"res_unit{p + 1}"
    else:
        named = {0: "snake1", 1: "conv_t1"}
        residual_units = range(2, 5)
        unit_name = lambda p: f"res_unit{p - 1}"
    if part in named:
        return f"{prefix}.{named[part]}.{rest}"
    if part in residual_units:
        unit = _residual(rest)
        return f"{prefix}.{unit_name(part)}.{unit}" if unit else None
    return None


# ----------------------------------------------------------------------------- weight norm
_WEIGHT_NORM_PAIRS = ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def fold_weight_norm(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """Replace each ``(g, v)`` weight-norm pair by ``weight = g * v / ||v||`` (norm over the dims where g is 1).

    Both spellings are handled: ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``, the
    original releases) and ``torch.nn.utils.parametrizations.weight_norm`` (``original0``/``original1``).
    """
    out = dict(state)
    for g_suffix, v_suffix in _WEIGHT_NORM_PAIRS:
        for g_key in [k for k in state if k.endswith(g_suffix)]:
            base = g_key[: -len(g_suffix)]
            v_key = base + v_suffix
            if v_key not in state:
                raise CodecWeightsError(f"DAC weights {file}: {g_key} has no matching {v_key}")
            g, v = out.pop(g_key).float(), out.pop(v_key).float()
            if g.dim() != v.dim() or any(gs not in (1, vs) for gs, vs in zip(g.shape, v.shape)):
                raise CodecWeightsError(
                    f"DAC weights {file}: weight-norm magnitude {g_key} {tuple(g.shape)} does not fit "
                    f"direction {v_key} {tuple(v.shape)}"
                )
            dims = [d for d in range(v.dim()) if g.shape[d] == 1]
            out[base + ".weight"] = g * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        for v_key in [k for k in out if k.endswith(v_suffix)]:
            raise CodecWeightsError(f"DAC weights {file}: {v_key} has no matching magnitude {v_key[: -len(v_suffix)] + g_suffix}")
    return out


# ----------------------------------------------------------------------------- building
def build_dac_network(arch: DacArchitecture, state: dict[str, torch.Tensor], file: Path) -> DacNetwork:
    """A DacNetwork holding ``state``: every key present, none extra, every shape right, or an error naming the file."""
    with torch.device("meta"):
        network = DacNetwork(arch)  # no memory, no init: the weights are assigned below
    expected = network.state_dict()
    missing, unexpected, bad = shape_differences({k: v.shape for k, v in state.items()},
                                                 {k: v.shape for k, v in expected.items()})
    wrong = [f"{k} {tuple(state[k].shape)} (architecture wants {tuple(expected[k].shape)})" for k in sorted(bad)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise CodecWeightsError(
            f"DAC weights {file} do not match the architecture its own config describes "
            f"({arch.sample_rate} Hz, {arch.n_codebooks} codebooks): tensors {', '.join(problems)}"
        )
    network.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
    return network.eval()


def release_of(arch: DacArchitecture) -> str | None:
    """The release variant name whose architecture equals ``arch`` (``None`` for a custom model)."""
    return next((name for name, a in DAC_VARIANTS.items() if a == arch), None)

