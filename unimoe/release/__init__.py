"""The authors' released UniMoE-Audio model (HITsz-TMG/Uni-MoE, ``foggyforest/UniMoE-Audio-preview``) in unimoe.

What the release does that unimoe's defaults do not is injected as components, declared as
entry points like every other (pyproject.toml): its router (:mod:`.router`), its prompt format
(:mod:`.tasks`) and its sampling defaults (:mod:`.presets`). :mod:`.config` and
:mod:`.weights` read its ``config.json`` and safetensors; :mod:`.convert` writes the unimoe model
folder (``unimoe import uni-moe-audio``). See docs/pretrained.md, "The authors' released model".
"""
