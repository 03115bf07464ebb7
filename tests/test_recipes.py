"""Every shipped recipe and preset parses and builds (meta device), and the recipes stay composed.

The model of every fit stage is followed to its source: a preset (specialists) or the upcycle
of earlier stages (warmup, joint), whose result must be exactly the MoE preset the curriculum
names, so a recipe and its presets cannot disagree silently.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from unimoe.model.config import PRESETS, AudioLMConfig, model_config, moe_config
from unimoe.model.params import count_parameters
from unimoe.model.transformer import meta_model
from unimoe.training.curriculum import compose_stage, load_curriculum, validate_stage_config
from unimoe.training.recipes import compose_file, deep_merge, load_tree
from unimoe.training.upcycle import check_upcycle_layout

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CURRICULA = sorted(RECIPES.rglob("curriculum.yaml"))
STAGE_FILES = [RECIPES / "demo" / "specialist.yaml", RECIPES / "demo" / "warmup.yaml", RECIPES / "joint.yaml"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_the_meta_device(name):
    config = AudioLMConfig.from_preset(name)
    model = meta_model(config)
    assert count_parameters(model) > 0
    if config.moe is not None:
        assert count_parameters(model, "min") < count_parameters(model, "max") <= count_parameters(model)


def _stage_models(cur) -> dict[str, AudioLMConfig]:
    """The model config every stage trains: its own (``model``) or the one its ``init_from`` chain makes."""
    models: dict[str, AudioLMConfig] = {}
    for stage in cur.stages:
        if stage.kind == "upcycle":
            spec = stage.upcycle
            dense = [models[s] for s in spec["specialists"]]
            assert all(d == dense[0] for d in dense), f"{stage.name}: specialists of different architectures"
            moe = moe_config(spec["moe"])
            check_upcycle_layout(dense[0], moe, len(dense), spec.get("pieces", 2))
            models[stage.name] = dense[0].replace(moe=moe, moe_layers=spec.get("moe_layers"))
            continue
        args = compose_stage(cur, stage)["model"]["init_args"]
        if args.get("model") is not None:
            models[stage.name] = model_config(args["model"])
        else:
            ref = stage.init_from if isinstance(stage.init_from, str) else stage.init_from["stage"]
            models[stage.name] = models[ref]
    return models


@pytest.mark.parametrize("path", CURRICULA, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_curriculum_stage_parses_and_its_model_builds(path):
    cur = load_curriculum(path, data_root="/data/unimoe")
    for stage in cur.stages:
        if stage.kind == "fit":
            validate_stage_config(compose_stage(cur, stage), stage)  # the real LightningCLI parser, nothing built
    models = _stage_models(cur)
    for name, config in models.items():
        assert count_parameters(meta_model(config)) > 0, name


def test_the_upcycled_models_are_the_moe_presets():
    demo = _stage_models(load_curriculum(RECIPES / "demo" / "curriculum.yaml", data_root="/d"))
    assert demo["specialist_tts"] == AudioLMConfig.from_preset("demo")
    assert demo["joint"] == demo["warmup"] == demo["upcycle"] == AudioLMConfig.from_preset("demo-moe")
    paper = _stage_models(load_curriculum(RECIPES / "paper" / "curriculum.yaml", data_root="/d"))
    preset = AudioLMConfig.from_preset("paper")
    # what the paper recipe changes on purpose (and says so): the tokenizer file, activation checkpointing
    changed = {"text_tokenizer", "gradient_checkpointing"}
    for field in AudioLMConfig.__dataclass_fields__:
        if field not in changed:
            assert getattr(paper["joint"], field) == getattr(preset, field), field
    assert paper["specialist_t2m"].intermediate_size * 8 == 2 * 4 * preset.moe.routed_intermediate_size * 2


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_stage_file_parses_on_its_own(path):
    from unimoe.training.curriculum import Stage

    cfg = compose_file(path, Path("/data/unimoe"))
    assert "extends" not in cfg and cfg["data"]["class_path"] == "UniMoEDataModule"
    cfg["data"]["init_args"].setdefault("sources", {"tts": "/data/unimoe/shards/tts"})  # the specialist's --data.init_args.sources
    validate_stage_config(cfg, Stage(name=path.stem, kind="fit", index=0))


def repeated_lines(root: Path) -> tuple[int, int]:
    """(repeated, total) non-blank, non-comment lines of every YAML under ``root``, stripped, whose
    text occurs more than once (the measure of docs/training.md, "Recipes")."""
    lines = [line.strip() for f in sorted(root.rglob("*.yaml")) for line in f.read_text().splitlines()]
    lines = [t for t in lines if t and not t.startswith("#")]
    counts = collections.Counter(lines)
    return sum(1 for t in lines if counts[t] > 1), len(lines)


def test_recipes_state_only_what_differs():
    repeated, total = repeated_lines(RECIPES)
    assert repeated / total < 0.15, f"{repeated} of {total} recipe lines occur more than once"


def test_extends_merges_replaces_and_reports_loops(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {x: 1, y: [1, 2], m: {p: 1}}\nkeep: 1\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\na: {y: [3], m: !replace {q: 2}}\n")
    (tmp_path / "top.yaml").write_text("extends: [mid.yaml]\nx-anchor: &v 5\nb: *v\n")
    tree, origin = load_tree(tmp_path / "top.yaml")
    assert tree == {"a": {"x": 1, "y": [3], "m": {"q": 2}}, "keep": 1, "x-anchor": 5, "b": 5}
    assert origin["keep"] == tmp_path / "base.yaml" and origin["b"] == tmp_path / "top.yaml"
    assert "x-anchor" not in compose_file(tmp_path / "top.yaml", None)
    assert deep_merge({"m": {"p": 1}}, {"m": {"q": 2}}) == {"m": {"p": 1, "q": 2}}
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    from unimoe.training.recipe_vars import RecipeError

    with pytest.raises(RecipeError, match="loops back"):
        load_tree(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nope.yaml\n")
    with pytest.raises(RecipeError, match="extends': file not found"):
        load_tree(tmp_path / "missing.yaml")


def test_a_model_is_a_preset_plus_what_differs():
    cfg = model_config({"preset": "demo-moe", "num_layers": 2, "moe": {"load_balance": {"steps": 7}}})
    base = AudioLMConfig.from_preset("demo-moe")
    assert cfg.num_layers == 2 and cfg.hidden_size == base.hidden_size
    assert cfg.moe.load_balance.steps == 7 and cfg.moe.load_balance.start == base.moe.load_balance.start
    assert cfg.moe.num_routed_experts == base.moe.num_routed_experts
    assert model_config({"preset": "demo-moe", "moe": None}).moe is None
    with pytest.raises(ValueError, match=r"unknown field 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        model_config({"preset": "demo", "hiden_size": 3})
    with pytest.raises(ValueError, match=r"unknown AudioLMConfig preset 'dmeo' \(did you mean 'demo'\?\)"):
        model_config("dmeo")
    with pytest.raises(ValueError, match="is a dense model"):
        moe_config("demo")
