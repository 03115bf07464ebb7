"""``unimoe curriculum``: specialists -> upcycle -> warmup -> joint, resumable stage by stage.

A curriculum file lists stages; each fit stage is a LightningCLI config (files + inline
overrides) run into ``<root>/<stage>/``, each upcycle stage merges earlier stages'
checkpoints. Stage N+1 starts from stage N through ``init_from`` (weights only, step 0).

State on disk (nothing else is needed to resume):

* a stage is **finished** when ``<root>/<stage>/DONE.json`` and its final checkpoint
  (the model folder ``final/``; ``upcycled/`` for an upcycle stage) exist; both are written
  atomically, the marker last. Finished stages are skipped and never overwritten.
* a fit stage with ``checkpoints/last.ckpt`` but no marker was **interrupted**: it resumes
  with ``--ckpt_path last.ckpt`` (optimizer, step, MLflow run) and without ``init_from``.
* ``<root>/curriculum.json`` summarises every stage (status, steps, losses, times);
  ``<root>/mlflow.db`` holds one MLflow experiment with one run per fit stage.

Modules: :mod:`.schema` (the file format below, parsed with errors naming file and field),
:mod:`.compose` (a stage's LightningCLI config and the checks before training), :mod:`.run`
(running and resuming), :mod:`.report` (the plan and summary tables). Files are read
through the one composition path of :mod:`unimoe.training.recipes`.

Schema (unknown keys are errors with a "did you mean"; ``x-*`` keys hold YAML anchors)::

    name: unimoe-demo              # MLflow experiment
    root: runs/demo                # relative to the cwd; --root overrides
    data_root: ../data             # relative to this file; --data_root / $UNIMOE_DATA_ROOT override
    launcher: inprocess            # or subprocess (one `unimoe fit` process per stage; needed for DDP)
    checkpoint_every_n_steps: 50   # last.ckpt cadence of every fit stage
    extends: other.yaml            # optional base curriculum (merged: mappings by key, `stages` replaced)
    defaults: {trainer: {...}}     # deep-merged under every fit stage's config
    stages:
      - name: specialist_tts
        config: specialist.yaml    # LightningCLI YAML (or a list), relative to this file
        model: {...}               # inline overrides: model / data / trainer / seed_everything
      - name: upcycle
        upcycle: {specialists: [specialist_tts, ...], pieces: 2, moe: demo-moe}   # or moe: {MoEConfig fields}
      - name: warmup
        config: warmup.yaml
        init_from: upcycle         # an earlier stage (its final model), a path, a Hub id, or
                                   # {stage|path, include, exclude, remap, strict}
"""

from unimoe.training.curriculum.compose import (
    check_data_paths, check_launcher, compose_stage, resolve_init_from, upcycle_options, validate_stage_config,
)
from unimoe.training.curriculum.run import STAGE_CONFIG, STATUS_FILE, CurriculumRunner, stage_status
from unimoe.training.curriculum.schema import (
    UPCYCLED_CHECKPOINT, Curriculum, Stage, checkpoint_of, final_model, load_curriculum,
)
from unimoe.training.recipes import deep_merge

__all__ = [
    "STAGE_CONFIG", "STATUS_FILE", "UPCYCLED_CHECKPOINT", "Curriculum", "CurriculumRunner", "Stage", "check_data_paths",
    "check_launcher", "checkpoint_of", "compose_stage", "deep_merge", "final_model", "load_curriculum", "resolve_init_from",
    "stage_status", "upcycle_options", "validate_stage_config",
]
