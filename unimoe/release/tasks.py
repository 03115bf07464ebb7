"""The release's prompt format as unimoe tasks: Qwen chat template + the release's audio markers.

The release wraps every request in the Qwen chat template and marks each part with its own
special tokens (``UniMoE_Audio_mod.py``)::

    tts  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
         <|SPEECH_PROMPT_START|>{prompt_text}<|SPEECH_PROMPT_END|>
         <|VOICE_PROMPT_START|>[AUDIO: prompt codes]<|VOICE_PROMPT_END|>
         <|SPEECH_START|>{text}<|SPEECH_END|><|im_end|>\\n<|im_start|>assistant\\n<|AUDIO_START|>[AUDIO: target]
    t2m  ...<|im_start|>user\\n<|MUSIC_START|>{caption}<|MUSIC_END|><|im_end|>\\n<|im_start|>assistant\\n<|AUDIO_START|>[AUDIO: target]

Its unconditional (CFG) rows: TTS keeps the voice prompt and its transcript and empties the
text; music replaces the caption with the negative prompt ``Low quality.``. Its voice prompt
is the delayed segment without the final column (``T + max(delays) + 1`` positions: the most
delayed codebook's EOS does not fit), the target segment is unimoe's own. The builders keep
the task names ``tts`` / ``t2m`` (manifests, evaluation families and metrics stay the same);
a model folder selects them in its ``tasks`` record (``{"tts": "uni_moe_audio_tts", ...}``).
The release's V2M path needs its Qwen2.5-VL vision tower, which unimoe does not implement.
"""

from __future__ import annotations

from typing import Any

from unimoe.model.delay import delayed_segment
from unimoe.model.tasks import Modality, Part, T2MBuilder, TTSBuilder

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER = "<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
AUDIO_START = "<|AUDIO_START|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|AUDIO_PLACEHOLDER|>", "<|AUDIO_START|>", "<|AUDIO_END|>",
    "<|SPEECH_START|>", "<|SPEECH_END|>",
    "<|VOICE_PROMPT_START|>", "<|VOICE_PROMPT_END|>",
    "<|SPEECH_PROMPT_START|>", "<|SPEECH_PROMPT_END|>",
    "<|MUSIC_START|>", "<|MUSIC_END|>",
)
"""The release's audio markers: each must be one token of the model's tokenizer."""
CHAT_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
NEGATIVE_MUSIC_PROMPT = "Low quality."


def check_special_tokens(tokenizer: Any, source: str) -> None:
    """Every marker the format uses must encode to exactly one id (the release asserts the same)."""
    bad = [t for t in (*CHAT_TOKENS, *SPECIAL_TOKENS) if len(tokenizer.encode(t)) != 1]
    if bad:
        raise ValueError(f"{source}: the release's prompt format needs these as single special tokens, but the "
                         f"tokenizer splits them: {bad}; use the tokenizer that ships with the released model")


class _ReleaseFormat:
    """Shared by the release's builders: text pieces, encoded one by one (markers split the text anyway)."""

    def _check_markers(self) -> None:
        check_special_tokens(self.tokenizer, f"{self.task} (uni-moe-audio format)")

    def _text(self, *pieces: str | list[int]) -> Part:
        ids: list[int] = []
        for piece in pieces:
            ids += self.tokenizer.encode(piece) if isinstance(piece, str) else piece
        return Part(Modality.TEXT, text=ids)


class ReleaseTTSBuilder(_ReleaseFormat, TTSBuilder):
    """Voice cloning in the release's format. The CFG row keeps the voice prompt (``uncond_keep``)."""

    def __init__(self, config: Any, *args: Any, uncond_keep: list[str] | tuple[str, ...] = ("prompt",),
                 **kwargs: Any) -> None:
        super().__init__(config, *args, uncond_keep=uncond_keep, **kwargs)
        self._check_markers()

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        text = self.text_ids(conditions["text"], "text") if "text" in keep else []
        head: list[str | list[int]] = [SYSTEM, USER]
        parts: list[Part] = []
        keep_prompt = "prompt" in keep or "prompt" not in conditions  # the transcript travels with its voice
        if "prompt_text" in conditions and keep_prompt:
            head += ["<|SPEECH_PROMPT_START|>", self.text_ids(conditions["prompt_text"], "prompt_text"),
                     "<|SPEECH_PROMPT_END|>"]
        if "prompt" in conditions and "prompt" in keep:
            prompt = self.codes(conditions["prompt"], "prompt")
            parts.append(self._text(*head, "<|VOICE_PROMPT_START|>"))
            segment = delayed_segment(prompt, self.config.delays, self.specials)[:, :-1]  # [C, T + D + 1]
            parts.append(Part(Modality.AUDIO, codes=segment))
            head = ["<|VOICE_PROMPT_END|>"]
        parts.append(self._text(*head, "<|SPEECH_START|>", text, "<|SPEECH_END|>", ASSISTANT, AUDIO_START))
        return parts


class ReleaseT2MBuilder(_ReleaseFormat, T2MBuilder):
    """Text-to-music in the release's format; the CFG row's caption is ``negative_prompt``."""

    def __init__(self, config: Any, *args: Any, negative_prompt: str = NEGATIVE_MUSIC_PROMPT, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.negative_prompt = negative_prompt
        self._check_markers()

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        caption = self.text_ids(conditions["text"], "text") if "text" in keep else self.negative_prompt
        return [self._text(SYSTEM, USER, "<|MUSIC_START|>", caption, "<|MUSIC_END|>", ASSISTANT, AUDIO_START)]
