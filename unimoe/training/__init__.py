"""Lightning training: the three curriculum stages, upcycling, callbacks and the CLI.

| module | what |
|---|---|
| ``stages.py`` | ``SpecialistStage``, ``WarmupStage``, ``JointStage`` (one shared ``StageModule``) |
| ``optim.py`` | ``OptimizerConfig``: AdamW + linear warmup + cosine |
| ``init_from.py`` | ``InitFrom``: start a stage from another stage's weights (include/exclude/remap) |
| ``upcycle.py`` | dense specialists -> one MoE checkpoint (``unimoe upcycle``) |
| ``metrics.py`` | exact per-task, per-codebook evaluation losses |
| ``callbacks/`` | ``ExpertLoadMonitor``, ``AudioSamples``, ``StageFinalizer`` |
| ``cli.py`` / ``run_logging.py`` | ``unimoe fit``: LightningCLI, MLflow store, checkpoints, resume rules |
| ``recipes.py`` | the one composition path of recipe YAML: ``extends``, merging, ``!replace``, variables |
| ``recipe_vars.py`` | ``${data_root}`` / ``${env:NAME}`` in recipe YAML |
| ``curriculum/`` | ``unimoe curriculum``: schema, compose, run, report (specialists -> upcycle -> warmup -> joint) |

User documentation: ``docs/training.md``. Submodules are imported on use (no Lightning import
cost for ``import unimoe.training``).
"""
