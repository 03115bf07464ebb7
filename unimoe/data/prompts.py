"""Speaker-prompt selection for voice cloning.

The prompt of an utterance is *another* utterance of the same speaker (never the target
itself, which would let the model copy instead of clone). Selection happens at import
time and is written into the manifest, so the pairing is visible, editable and identical
on every tokenisation run; it is seeded per speaker, so adding a speaker does not change
the pairs of the others.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

from unimoe.data.manifest import ManifestEntry
from unimoe.model.tasks import task_class
from unimoe.registry import RegistryError


def takes_speaker_prompt(task: str) -> bool:
    """Whether ``task``'s examples are paired with another utterance of their speaker (its declaration)."""
    try:
        return task_class(task).speaker_prompt
    except RegistryError:  # unknown task: the manifest check reports it; no pairing here
        return False


def _speaker_rng(seed: int, speaker: str, split: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{split}:{speaker}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def assign_prompts(
    entries: list[ManifestEntry],
    *,
    seed: int = 0,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    overwrite: bool = False,
) -> int:
    """Give every entry of a speaker-prompt task (``TaskBuilder.speaker_prompt``: tts) with a speaker a
    prompt from the same speaker and split.

    Candidates whose duration is known and within ``[min_seconds, max_seconds]`` are
    preferred; if a speaker has none, any other utterance of theirs is used. Entries of a
    speaker with a single utterance get no prompt (tokenisation then skips them with the
    reason "missing prompt"). Returns how many entries are left without a prompt.
    """
    cloned = {t for t in {e.task for e in entries} if takes_speaker_prompt(t)}
    groups: dict[tuple[str, str], list[ManifestEntry]] = defaultdict(list)
    for entry in entries:
        if entry.task in cloned and entry.speaker is not None:
            groups[(entry.split, entry.speaker)].append(entry)
    without = sum(1 for e in entries if e.task in cloned and e.speaker is None and not e.prompt_audio)
    for (split, speaker), group in sorted(groups.items()):
        rng = _speaker_rng(seed, speaker, split)
        group = sorted(group, key=lambda e: e.id)
        good = [e for e in group if e.duration is not None and min_seconds <= e.duration <= max_seconds]
        for entry in group:
            if entry.prompt_audio and not overwrite:
                continue
            pool = [e for e in good if e.id != entry.id and e.audio != entry.audio]
            if not pool:
                pool = [e for e in group if e.id != entry.id and e.audio != entry.audio]
            if not pool:
                entry.prompt_audio = None
                entry.prompt_text = None
                without += 1
                continue
            choice = pool[rng.randrange(len(pool))]
            entry.prompt_audio = choice.audio
            entry.prompt_text = choice.text
    return without
