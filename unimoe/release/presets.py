"""The release's sampling defaults per task as named generation presets (``unimoe generate --preset``).

Read from ``UniMoE_Audio_mod.py`` (``text_to_speech``, ``text_to_music``,
``video_text_to_music``) and ``UniMoE_Audio_model.py`` (``generate``, ``_decoder_step``):

* guidance ``cond + s_r * (cond - uncond)``; unimoe writes ``uncond + s * (cond - uncond)``,
  so ``s = s_r + 1`` (TTS ``s_r = 1`` -> 2; music ``s_r = 10`` -> 11);
* temperature 1.0, top-p 1.0 (off), the top-k 45 filter;
* the codebook-0 EOS logit multiplied by ``eos_prob_mul_factor`` (music 0.6, TTS 1.0) before
  the "EOS only as the argmax" rule (``eos_logit_scale`` here);
* ``MIN_TOKENS = 100`` frames before EOS may end a clip (2 s at DAC's 50 frames/s) and
  ``MAX_TOKENS = 1000`` decoding steps including the 18-step delay tail: EOS is forced at
  frame 981 (19.62 s).
"""

from __future__ import annotations

from typing import Any

FRAME_RATE = 50.0  # DAC 16 kHz, the release's codec
MIN_FRAMES, MAX_FRAMES = 100, 1000 - 18 - 1


def _common(release_cfg: float, eos_factor: float) -> dict[str, Any]:
    return {
        "temperature": 1.0, "top_k": 45, "top_p": 1.0,
        "cfg_scale": release_cfg + 1.0 if release_cfg != 0 else 1.0,
        "eos_logit_scale": eos_factor,
        "min_seconds": MIN_FRAMES / FRAME_RATE, "max_seconds": MAX_FRAMES / FRAME_RATE,
    }


def tts() -> dict[str, Any]:
    """``text_to_speech`` defaults: cfg 1.0 (release) = 2.0 here, EOS factor 1.0."""
    return _common(1.0, 1.0)


def t2m() -> dict[str, Any]:
    """``text_to_music`` defaults: cfg 10.0 (release) = 11.0 here, EOS factor 0.6."""
    return _common(10.0, 0.6)


def v2m() -> dict[str, Any]:
    """``video_text_to_music`` defaults (same as text-to-music)."""
    return _common(10.0, 0.6)
