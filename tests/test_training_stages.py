"""Stage modules: warmup freezing, aux weight across resume, init_from rules and exclusivity,
optimizer schedule, exact per-task validation losses, configuration errors."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

HELPERS = Path(__file__).parent / "helpers"

from training_helpers import tiny_data  # noqa: E402

from unimoe.checkpoint import CheckpointMetadata, load_model, save_model, save_model_checkpoint  # noqa: E402
from unimoe.data.datamodule import UniMoEDataModule  # noqa: E402
from unimoe.model.config import AudioLMConfig  # noqa: E402
from unimoe.model.tasks import IGNORE_INDEX, TaskIds, build_task_builder, collate  # noqa: E402
from unimoe.model.transformer import AudioLM  # noqa: E402
from unimoe.moe.config import MoEConfig  # noqa: E402
from unimoe.training.init_from import InitFrom, load_initial_weights  # noqa: E402
from unimoe.training.metrics import TaskLossAccumulator  # noqa: E402
from unimoe.training.optim import OptimizerConfig, parameter_groups, warmup_cosine_factor  # noqa: E402
from unimoe.training.stages import JointStage, SpecialistStage, StageModule, WarmupStage  # noqa: E402
from unimoe.training.upcycle import Specialist, upcycle  # noqa: E402

TINY = AudioLMConfig.from_preset("tiny")
MOE = MoEConfig(num_routed_experts=6, routed_intermediate_size=64, num_null_experts=1, num_shared_experts=1,
                shared_intermediate_size=32, router={"name": "top_p", "top_p": 0.7, "jitter": 0.01})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.getbasetemp())


def datamodule(data, mix="seed", **kw):
    sources = {t: str(data / "shards" / t) for t in ("tts", "t2m", "v2m")}
    return UniMoEDataModule(sources=sources, model="tiny", mix=mix, seed_size=12, max_tokens=2048, **kw)


def trainer(root, steps, callbacks=(), **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(root), num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=list(callbacks), **{"enable_checkpointing": False, **kw})


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory, data):
    specs = []
    for seed, task in zip((1, 2, 3), ("tts", "t2m", "v2m")):
        torch.manual_seed(seed)
        meta = CheckpointMetadata(config=TINY, codec={"name": "spectral_rvq", "path": str(data / "codec.pt")}, stage="specialist",
                                  extra={"data_tasks": [task], "label": task})
        specs.append(Specialist(AudioLM(TINY).state_dict(), meta, task))
    result = upcycle(specs, MOE, pieces=2)
    return save_model_checkpoint(tmp_path_factory.mktemp("up") / "upcycled.ckpt", result.model, result.metadata)


def is_router_or_shared(name: str) -> bool:
    return ".ffn.router." in name or ".ffn.shared_experts." in name


# ---------------------------------------------------------------------- warmup freezing
def test_warmup_changes_only_routers_and_shared_experts(data, upcycled, tmp_path):
    stage = WarmupStage(init_from=str(upcycled), optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1))
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    t = trainer(tmp_path, steps=3)
    t.fit(stage, datamodule(data))
    after = stage.model.state_dict()
    frozen = [k for k in before if not is_router_or_shared(k)]
    trained = [k for k in before if is_router_or_shared(k)]
    assert len(frozen) > 20 and len(trained) == 2 * 3  # 2 layers x (gate, shared gate_up, shared down)
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"frozen tensor {key} changed"
    for key in trained:
        assert not torch.equal(before[key], after[key]), f"trainable tensor {key} did not train"
    in_optimizer = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    expected = {id(p) for n, p in stage.model.named_parameters() if is_router_or_shared(n)}
    assert in_optimizer == expected
    assert all(p.requires_grad == is_router_or_shared(n) for n, p in stage.model.named_parameters())


# ---------------------------------------------------------------------- aux weight across resume
class RecordAuxWeight(Callback):
    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step - 1] = pl_module.step_stats.aux_weight  # weight used by that step


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


def test_aux_weight_is_a_function_of_the_restored_global_step(data, tmp_path):
    model = TINY.replace(moe=MOE)
    schedule = {"start": 0.5, "end": 0.1, "steps": 4}
    expected = {s: 0.5 + (0.1 - 0.5) * min(s, 4) / 4 for s in range(6)}

    first, ckpt = RecordAuxWeight(), ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path, 6, [first, CrashAt(3), ckpt], enable_checkpointing=True).fit(
            JointStage(model=model, load_balance=schedule), datamodule(data, mix="balanced"))
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    second = RecordAuxWeight()
    trainer(tmp_path, 6, [second]).fit(JointStage(model=model, load_balance=schedule), datamodule(data, mix="balanced"),
                                       ckpt_path=str(last))
    assert min(second.by_step) == 2  # continued at the restored step, not at 0
    merged = {**first.by_step, **second.by_step}
    assert sorted(merged) == list(range(6))
    for step, weight in merged.items():
        assert weight == pytest.approx(expected[step]), step


# ---------------------------------------------------------------------- init_from
@pytest.mark.parametrize("name", ["src.ckpt", "src"])  # a .ckpt file or a model folder (read lazily)
def test_init_from_include_exclude_remap_and_strict(tmp_path, name):
    torch.manual_seed(0)
    source = AudioLM(TINY)
    path = save_model(tmp_path / name, source, CheckpointMetadata(config=TINY))
    src = source.state_dict()

    torch.manual_seed(1)
    target = AudioLM(TINY)
    fresh_head = target.audio_head.weight.detach().clone()
    report = load_initial_weights(target, InitFrom(path=str(path), exclude=["audio_head.*"], strict=False))
    assert report.not_initialised == ["audio_head.weight"]
    assert torch.equal(target.audio_head.weight, fresh_head)
    assert torch.equal(target.text_embed.weight, src["text_embed.weight"])
    with pytest.raises(ValueError, match="not in the checkpoint.*audio_head.weight"):
        load_initial_weights(AudioLM(TINY), InitFrom(path=str(path), exclude=["audio_head.*"]))

    target = AudioLM(TINY)
    spec = InitFrom(path=str(path), include=["blocks.0.attn.*"], remap={r"^blocks\.0\.": "blocks.1."}, strict=False)
    load_initial_weights(target, spec)
    assert torch.equal(target.blocks[1].attn.q_proj.weight, src["blocks.0.attn.q_proj.weight"])
    assert not torch.equal(target.blocks[1].attn.q_proj.weight, src["blocks.1.attn.q_proj.weight"])
    with pytest.raises(ValueError, match="maps two checkpoint keys"):
        load_initial_weights(AudioLM(TINY), InitFrom(path=str(path), remap={r"^blocks\.0\.": "blocks.1."}))

    with pytest.raises(ValueError, match="shape mismatch"):
        load_initial_weights(AudioLM(TINY.replace(intermediate_size=64)), InitFrom(path=str(path)))
    with pytest.raises(ValueError, match="unknown field"):
        InitFrom.coerce({"path": str(path), "exlude": ["x"]})


def test_init_from_and_ckpt_path_are_mutually_exclusive(data, upcycled, tmp_path):
    stage = WarmupStage(init_from=str(upcycled))
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path, 1, [ck], enable_checkpointing=True).fit(stage, datamodule(data))
    again = WarmupStage(init_from=str(upcycled))
    with pytest.raises(ValueError, match="mutually exclusive"):
        trainer(tmp_path, 2).fit(again, datamodule(data), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))


def test_cli_refuses_init_from_with_ckpt_path_and_a_foreign_class(data, upcycled, tmp_path, capsys):
    import yaml

    from unimoe.training.cli import run_lightning_cli

    config = tmp_path / "warmup.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "WarmupStage", "init_args": {"init_from": str(upcycled)}},
        "data": {"class_path": "unimoe.data.datamodule.UniMoEDataModule",
                 "init_args": {"sources": {"tts": "${data_root}/shards/tts"}, "model": "tiny", "mix": "seed",
                               "seed_size": 4, "max_tokens": 2048}},
        "trainer": {"max_steps": 1, "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 0},
    }))
    base = ["fit", "--config", str(config), "--data_root", str(data)]
    assert run_lightning_cli(base) == 0
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert run_lightning_cli([*base, "--ckpt_path", last]) == 2
    assert "mutually exclusive" in capsys.readouterr().err
    # resume = drop init_from; the restored hparams bring it back and the CLI drops it again
    assert run_lightning_cli([*base, "--trainer.max_steps", "2", "--model.init_args.init_from", "null", "--ckpt_path", last]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert run_lightning_cli([*base, "--model.class_path", "JointStage", "--model.init_args.init_from", "null",
                              "--ckpt_path", last]) == 2
    assert "was written by unimoe.training.stages.WarmupStage" in capsys.readouterr().err


# ---------------------------------------------------------------------- optimizer
def test_warmup_cosine_schedule_and_parameter_groups():
    assert warmup_cosine_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    model = AudioLM(TINY)
    model.norm.weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model.named_parameters(), 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert not any(p is model.norm.weight for p in no_decay["params"])
    with pytest.raises(ValueError, match="OptimizerConfig.lr"):
        OptimizerConfig(lr=-1.0)


# ---------------------------------------------------------------------- validation losses
def test_per_task_per_codebook_losses_match_a_direct_computation():
    torch.manual_seed(0)
    model = AudioLM(TINY).eval()
    C, K = TINY.num_codebooks, TINY.codebook_size
    seqs = [build_task_builder("tts", TINY).build(torch.randint(0, K, (C, 6 + i)), drop_condition=False, text="hi",
                                                  prompt=torch.randint(0, K, (C, 3))) for i in range(3)]
    seqs += [build_task_builder("t2m", TINY).build(torch.randint(0, K, (C, 9 + i)), drop_condition=False, text="calm")
             for i in range(2)]
    batches = [collate(seqs[:2]), collate(seqs[2:])]
    acc = TaskLossAccumulator(C, TaskIds.legacy())
    sums, counts = {}, {}
    with torch.no_grad():
        for batch in batches:
            out = model(batch, logits="all")
            acc.update(out.token_loss, batch.labels, batch.task_ids)
            for b in range(batch.labels.shape[0]):
                task = TaskIds.legacy().name(int(batch.task_ids[b, 0]))
                for c in range(C):
                    labels = batch.labels[b, c]
                    keep = labels != IGNORE_INDEX
                    ce = F.cross_entropy(out.logits[b, keep, c], labels[keep], reduction="sum")
                    sums[(task, c)] = sums.get((task, c), 0.0) + float(ce)
                    counts[(task, c)] = counts.get((task, c), 0) + int(keep.sum())
    metrics = acc.compute("val")
    for task in ("tts", "t2m"):
        for c in range(C):
            assert metrics[f"val/loss/{task}/cb{c}"] == pytest.approx(sums[(task, c)] / counts[(task, c)], rel=1e-5)
        assert metrics[f"val/loss/{task}"] == pytest.approx(sum(sums[(task, c)] / counts[(task, c)] for c in range(C)), rel=1e-5)
    overall = sum(sum(sums[(t, c)] for t in ("tts", "t2m")) / sum(counts[(t, c)] for t in ("tts", "t2m")) for c in range(C))
    assert metrics["val/loss"] == pytest.approx(overall, rel=1e-5)
    assert metrics["val/loss/speech"] == pytest.approx(metrics["val/loss/tts"])
    assert metrics["val/loss/music"] == pytest.approx(metrics["val/loss/t2m"])
    assert "val/loss/v2m" not in metrics


# ---------------------------------------------------------------------- configuration errors
def test_stage_configuration_errors_name_the_problem(data, tmp_path):
    with pytest.raises(ValueError, match="SpecialistStage trains a dense model"):
        SpecialistStage(model="tiny-moe")
    with pytest.raises(ValueError, match="WarmupStage needs an MoE model"):
        WarmupStage(model="tiny")
    with pytest.raises(ValueError, match=r"trainable: pattern 'blocks\.\*\.nothing' matches no model parameter"):
        WarmupStage(model="tiny-moe", trainable=["blocks.*.nothing"])
    with pytest.raises(ValueError, match="give model .* or init_from"):
        JointStage()
    with pytest.raises(ValueError, match="unknown field"):
        JointStage(model="tiny-moe", optimizer={"learning_rate": 1.0})
    dm = UniMoEDataModule(sources={"tts": str(data / "shards" / "tts")}, model=TINY.replace(delays=[0, 2, 4, 6]),
                          max_tokens=2048)
    with pytest.raises(ValueError, match="delays: data"):
        trainer(tmp_path, 1).fit(SpecialistStage(model="tiny"), dm)
    # a codec of the same shape but another fit (other codebooks) is not the shards' codec
    from unimoe.codecs.spectral_rvq import SpectralRVQCodec

    real = SpectralRVQCodec(path=str(data / "codec.pt"))
    other = SpectralRVQCodec.from_fitted(real.config, real.mean, real.std, real.codebooks.flip(1))
    other.save(tmp_path / "other.pt")
    stage = SpecialistStage(model="tiny", codec={"name": "spectral_rvq", "path": str(tmp_path / "other.pt")})
    with pytest.raises(ValueError, match="not the codec of the shards.*weights_sha256"):
        trainer(tmp_path, 1).fit(stage, datamodule(data, mix="raw"))
    with pytest.raises(ValueError, match="cannot be built"):
        trainer(tmp_path, 1).fit(SpecialistStage(model="tiny", codec={"name": "spectral_rvq", "path": "nope.pt"}),
                                 datamodule(data, mix="raw"))


def test_specialist_checkpoint_describes_itself(data, tmp_path):
    stage = SpecialistStage(model="tiny", codec={"name": "spectral_rvq", "path": str(data / "codec.pt")}, label="speech")
    t = trainer(tmp_path, 2)
    t.fit(stage, datamodule(data, mix="raw"))
    t.save_checkpoint(tmp_path / "s.ckpt", weights_only=True)
    model, meta = load_model(tmp_path / "s.ckpt")
    assert meta.stage == "specialist" and meta.codec["path"].endswith("codec.pt") and meta.extra["label"] == "speech"
    assert set(meta.extra["data_tasks"]) <= {"tts", "t2m", "v2m"} and meta.extra["data_tasks"]
    for key, value in stage.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert isinstance(stage, StageModule)
