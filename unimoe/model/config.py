"""Configuration of the audio language model, and named presets from CPU-tiny to the paper.

A plain dataclass so LightningCLI/jsonargparse can fill it from YAML. Presets are
functions returning a config and the one place a model is written down: recipes name one
(``model: demo``) or start from one and state what differs
(``model: {preset: paper-specialist, num_codebooks: 8, ...}``, see :func:`model_config`);
in Python ``AudioLMConfig.from_preset("paper", num_layers=4)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from unimoe.model.text_tokenizer import build_text_tokenizer
from unimoe.moe.config import MoEConfig
from unimoe.moe.losses import AuxLossSchedule
from unimoe.registry import ComponentField, plain_spec

PAPER_DELAYS: List[int] = [0] + list(range(8, 19))
"""The paper's per-codebook delays for 12 codebooks: ``[0, 8, 9, ..., 18]``."""


@dataclass
class AudioLMConfig:
    """Decoder-only LM over text tokens, delayed codec frames and visual soft tokens."""

    # --- backbone
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None
    """Per-head width; None = hidden_size // num_heads."""
    intermediate_size: int = 704
    """Width of the dense SwiGLU FFN in layers without MoE (the specialists' FFN)."""
    qkv_bias: bool = True
    """Bias on the q/k/v projections (Qwen2.5 has it)."""
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    """RoPE frequency scaling of a pretrained LM: None, ``{"rope_type": "linear", "factor": f}`` or
    Llama 3.1's ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` (see :mod:`unimoe.model.rope`)."""
    max_seq_len: int = 4096
    """Longest sequence a task builder may produce and the default KV-cache length."""

    # --- Dynamic-Capacity MoE
    moe: Optional[MoEConfig] = None
    """MoE FFN config; None = every FFN is dense (a specialist)."""
    moe_layers: Optional[List[int]] = None
    """Layer indices whose FFN is the MoE layer; None = all layers (when ``moe`` is set)."""

    # --- text
    text_tokenizer: ComponentField = "bytes"
    """TEXT_TOKENIZERS spec: ``"bytes"`` (offline default) or ``{"name": "hf", "path": ...}``."""
    text_vocab_size: Optional[int] = None
    """Rows of the text embedding; None = the tokenizer's vocabulary rounded up to 64."""
    text_head: bool = False
    """Add a hidden -> text-vocab head (the authors' release carries Qwen's LM head; the audio
    loss never uses it). For parity with the release and with pretrained LMs' text logits."""
    tie_text_head: bool = False
    """The text head is the text embedding matrix itself (``tie_word_embeddings`` of Qwen2.5 <= 3B,
    Llama 3.2): no separate weight. Needs ``text_head``."""

    # --- audio
    num_codebooks: int = 12
    codebook_size: int = 1024
    """Real codes per codebook (K); the model adds eos=K, pad=K+1, bos=K+2."""
    delays: List[int] = field(default_factory=lambda: list(PAPER_DELAYS))

    # --- vision
    vision: Optional[ComponentField] = None
    """VISION_ENCODERS spec (``"vit"`` or ``{"name": "vit", "depth": 32, ...}``); None = no video input."""

    # --- init / memory
    init_std: float = 0.02
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.text_tokenizer, self.vision = plain_spec(self.text_tokenizer), plain_spec(self.vision)
        if isinstance(self.moe, dict):  # plain-Python / checkpoint construction from a mapping
            self.moe = MoEConfig(**self.moe)
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len", "num_codebooks", "codebook_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AudioLMConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"AudioLMConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"AudioLMConfig.hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim")
        if self.head_size % 2:
            raise ValueError(f"AudioLMConfig.head_dim must be even for rotary embeddings, got {self.head_size}")
        if len(self.delays) != self.num_codebooks:
            raise ValueError(f"AudioLMConfig.delays has {len(self.delays)} entries but num_codebooks is {self.num_codebooks}")
        if any(int(d) != d or d < 0 for d in self.delays):
            raise ValueError(f"AudioLMConfig.delays must be non-negative ints, got {self.delays}")
        if self.tie_text_head and not self.text_head:
            raise ValueError("AudioLMConfig.tie_text_head needs text_head: true (the tied head is a text head)")
        from unimoe.model.rope import check_rope_scaling

        self.rope_scaling = check_rope_scaling(self.rope_scaling, "AudioLMConfig.rope_scaling")
        if self.text_vocab_size is not None and self.text_vocab_size < 1:
            raise ValueError(f"AudioLMConfig.text_vocab_size must be positive, got {self.text_vocab_size}")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"AudioLMConfig.moe_layers has indices {bad} outside 0..{self.num_layers - 1}")
            if self.moe is None:
                raise ValueError("AudioLMConfig.moe_layers is set but moe is None; give a MoEConfig")

    # ------------------------------------------------------------------ derived
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def audio_vocab_size(self) -> int:
        """Per-codebook vocabulary: K codes + eos, pad, bos."""
        return self.codebook_size + 3

    def is_moe_layer(self, index: int) -> bool:
        if self.moe is None:
            return False
        return self.moe_layers is None or index in self.moe_layers

    def resolved_text_vocab_size(self) -> int:
        """``text_vocab_size`` or the tokenizer's vocabulary rounded up to a multiple of 64."""
        if self.text_vocab_size is not None:
            return self.text_vocab_size
        return 64 * math.ceil(build_text_tokenizer(self.text_tokenizer).vocab_size / 64)

    def replace(self, **changes: Any) -> "AudioLMConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AudioLMConfig":
        if name not in PRESETS:
            close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown AudioLMConfig preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name](), **overrides)


# ---------------------------------------------------------------------- from recipes
def model_config(value: Any, where: str = "model") -> AudioLMConfig:
    """An :class:`AudioLMConfig` from what a recipe or a checkpoint holds.

    * a preset name: ``"demo"``;
    * a mapping of fields, optionally starting from a preset: ``{preset: paper-specialist,
      num_codebooks: 8, delays: [...]}`` (only what differs); a ``moe`` mapping then changes
      the preset's MoE field by field (``moe: {load_balance: {steps: 600}}``), ``moe: null``
      makes it dense;
    * an ``AudioLMConfig`` (returned as is).

    Unknown fields are errors naming ``where`` and the closest known field.
    """
    if isinstance(value, AudioLMConfig):
        return value
    if isinstance(value, str):
        return AudioLMConfig.from_preset(value)
    if hasattr(value, "as_dict") and callable(value.as_dict):  # a jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a preset name or a mapping of AudioLMConfig fields, got {type(value).__name__}")
    data = dict(value)
    preset = data.pop("preset", None)
    _check_fields(data, [f.name for f in dataclasses.fields(AudioLMConfig)], where)
    base = AudioLMConfig.from_preset(preset) if preset is not None else None
    if isinstance(data.get("moe"), dict):
        data["moe"] = moe_config(data["moe"], f"{where}.moe", base=base.moe if base is not None else None)
    return dataclasses.replace(base, **data) if base is not None else AudioLMConfig(**data)


def moe_config(value: Any, where: str = "moe", base: Optional[MoEConfig] = None) -> MoEConfig:
    """A :class:`MoEConfig` from a recipe: the MoE of a preset (``"demo-moe"``), a mapping of
    fields (``preset:`` to start from one, else from ``base`` when given), or a ``MoEConfig``."""
    if isinstance(value, MoEConfig):
        return value
    if isinstance(value, str):
        moe = AudioLMConfig.from_preset(value).moe
        if moe is None:
            raise ValueError(f"{where}: preset {value!r} is a dense model (no MoE); name an MoE preset")
        return moe
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an MoE preset name or a mapping of MoEConfig fields, got {type(value).__name__}")
    data = dict(value)
    if "preset" in data:
        base = moe_config(data.pop("preset"), where)
    _check_fields(data, [f.name for f in dataclasses.fields(MoEConfig)], where)
    if base is not None:
        if isinstance(data.get("load_balance"), dict):
            data["load_balance"] = dataclasses.replace(base.load_balance, **data["load_balance"])
        return dataclasses.replace(base, **data)
    return MoEConfig(**data)


def _check_fields(data: dict[str, Any], known: list[str], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown field {key!r}{hint}")


# ---------------------------------------------------------------------- presets
def _tiny_vision() -> Dict[str, Any]:
    return {"name": "vit", "width": 32, "depth": 1, "num_heads": 2, "intermediate_size": 64,
            "patch_size": 8, "temporal_patch_size": 2, "merge_size": 2, "image_size": 32, "num_frames": 4}


def qwen25_vl_vision() -> Dict[str, Any]:
    """Qwen2.5-VL's vision tower dimensions (~669M parameters with the merger)."""
    return {"name": "vit", "width": 1280, "depth": 32, "num_heads": 16, "intermediate_size": 3420,
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_size": 224, "num_frames": 8}


def tiny() -> AudioLMConfig:
    """Seconds on a CPU: for tests and smoke runs."""
    return AudioLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                         max_seq_len=1024, num_codebooks=4, codebook_size=16, delays=[0, 1, 2, 3],
                         vision=_tiny_vision())


def tiny_moe() -> AudioLMConfig:
    """``tiny`` with the Dynamic-Capacity MoE in every layer: 4 routed + 1 null + 1 shared."""
    return tiny().replace(moe=MoEConfig(num_routed_experts=4, routed_intermediate_size=64, num_null_experts=1,
                                        num_shared_experts=1, shared_intermediate_size=32,
                                        router={"name": "top_p", "top_p": 0.7}))


def small() -> AudioLMConfig:
    """~40M-parameter dense specialist for the offline demo on one GPU or a patient CPU."""
    return AudioLMConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                         max_seq_len=2048, vision={"name": "vit", "width": 256, "depth": 4, "num_heads": 4,
                                                   "intermediate_size": 688, "patch_size": 16, "image_size": 128,
                                                   "num_frames": 8})


def small_moe() -> AudioLMConfig:
    """``small`` with the paper's expert layout scaled down (8 routed + 1 null + 2 shared)."""
    return small().replace(moe=MoEConfig(num_routed_experts=8, routed_intermediate_size=352, num_null_experts=1,
                                         num_shared_experts=2, shared_intermediate_size=176,
                                         router={"name": "top_p", "top_p": 0.7}))


def demo() -> AudioLMConfig:
    """The offline demo's dense specialist (~3.2M parameters, minutes on 2 CPU cores).

    Sized for the demo's fitted ``spectral_rvq`` codec (8 codebooks x 1024 at 50 frames/s,
    one frame of delay per codebook). Its FFN of 512 splits into 2 routed experts of 256 per
    specialist when upcycled into ``demo-moe``.
    """
    return AudioLMConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                         max_seq_len=1024, num_codebooks=8, codebook_size=1024, delays=list(range(8)),
                         vision=_tiny_vision())


def demo_moe() -> AudioLMConfig:
    """What ``unimoe upcycle`` makes of 3 ``demo`` specialists (tts, t2m, v2m) x 2 pieces: 6 routed
    experts of 256 + 1 null + 2 shared of 128, top-p 0.7; load-balance weight 0.025 -> 0.001
    over the demo joint stage's 600 steps."""
    return demo().replace(moe=MoEConfig(num_routed_experts=6, routed_intermediate_size=256, num_null_experts=1,
                                        num_shared_experts=2, shared_intermediate_size=128,
                                        router={"name": "top_p", "top_p": 0.7, "jitter": 0.01},
                                        load_balance=AuxLossSchedule(0.025, 0.001, 600)))


def paper_dense() -> AudioLMConfig:
    """Qwen2.5-VL-3B's text stack as a dense AudioLM (FFN 11008): the authors' starting point.

    With the paper's codec layout (DAC, 12 codebooks x 1024, delays ``[0, 8, 9, ..., 18]``)
    and Qwen's text vocabulary. Not the specialist unimoe upcycles: see ``paper-specialist``.
    """
    return AudioLMConfig(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                         qkv_bias=True, rope_theta=1_000_000.0, max_seq_len=8192, text_vocab_size=151936,
                         text_head=True, num_codebooks=12, codebook_size=1024, delays=list(PAPER_DELAYS),
                         vision=qwen25_vl_vision())


def paper_specialist() -> AudioLMConfig:
    """A paper-scale specialist: ``paper-dense`` with FFN 5504, so 4 specialists x 2 pieces are
    exactly the paper's 8 routed experts of 2752 (the paper's own numbers cannot all hold; see
    docs/training.md, "Upcycling: the 11008 / 2752 inconsistency"). ``recipes/paper`` trains these."""
    return paper_dense().replace(intermediate_size=5504)


def paper() -> AudioLMConfig:
    """UniMoE-Audio: 8 routed experts of 2752 + 1 null + 2 shared of 1376, top-p 0.7, every layer.

    Exactly what upcycling 4 ``paper-specialist`` models with 2 pieces each produces (its
    ``intermediate_size`` 5504 is the specialists'; every FFN is MoE, so it holds no weights).
    """
    return paper_specialist().replace(moe=MoEConfig(num_routed_experts=8, routed_intermediate_size=2752,
                                                    num_null_experts=1, num_shared_experts=2,
                                                    shared_intermediate_size=1376,
                                                    router={"name": "top_p", "top_p": 0.7, "jitter": 0.01}))


PRESETS: Dict[str, Callable[[], AudioLMConfig]] = {
    "tiny": tiny,
    "tiny-moe": tiny_moe,
    "small": small,
    "small-moe": small_moe,
    "demo": demo,
    "demo-moe": demo_moe,
    "paper-dense": paper_dense,
    "paper-specialist": paper_specialist,
    "paper": paper,
}
