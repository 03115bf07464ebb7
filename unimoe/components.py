"""Import every in-tree module that registers components, so registries are complete.

Commands and the CLI import this module before parsing configs; each subsystem that
registers something lists its module here once.
"""

import importlib

_MODULES = (
    "unimoe.moe.routers",
    "unimoe.moe.experts",
    "unimoe.codecs",
    "unimoe.model.tasks",
    "unimoe.model.vision",
    "unimoe.model.text_tokenizer",
    "unimoe.evaluation.backends",
)

for _name in _MODULES:
    importlib.import_module(_name)
