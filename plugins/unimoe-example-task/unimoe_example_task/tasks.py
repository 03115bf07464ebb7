"""``t2a``: a description of a sound (rain on a tin roof, a door slam) -> that sound.

Everything unimoe needs to know about the task is declared on the class: manifests check
that ``text`` is there, validation groups its losses under the ``sound`` domain, evaluation
files its clips under that family, generation requests take ``text`` and an optional
reference clip to imitate (``prompt``), and the layout below is what the model trains on.

    t2a  [TEXT: bos "text to sound: " description eos] [AUDIO: reference segment]? [AUDIO: target segment]
"""

from __future__ import annotations

from typing import Any

from unimoe.model.tasks import Part, TaskBuilder


class TextToSoundBuilder(TaskBuilder):
    task = "t2a"
    domain = "sound"
    conditions = ("text", "prompt")
    required = ("text",)
    text_role = "description"
    default_instruction = "text to sound: "

    def layout(self, conditions: dict[str, Any], keep: set[str]) -> list[Part]:
        description = self.text_ids(conditions["text"], "text") if "text" in keep else []
        parts = [self.text_block(description)]
        if "prompt" in conditions and "prompt" in keep:
            parts.append(self.audio_block(self.codes(conditions["prompt"], "prompt")))
        return parts
