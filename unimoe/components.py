"""Import every in-tree module that registers components, so registries are complete.

Each subsystem adds its module here once; importing this module is how commands and the
CLI make sure every built-in router, expert, codec, metric and task is registered.
"""

import importlib

_MODULES = [
    "unimoe.moe.routers",
    "unimoe.moe.experts",
    "unimoe.codecs",
    "unimoe.model.tasks",
    "unimoe.model.vision",
    "unimoe.model.text_tokenizer",
    "unimoe.evaluation.backends",
]

for _name in _MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a subsystem not built yet must not break the others
        if exc.name is None or not _name.startswith(exc.name):
            raise
