"""Starting from a pretrained causal LM: tiny random ``transformers`` Qwen2 and Llama models, saved
with ``save_pretrained`` (single file and sharded), loaded into unimoe through ``init_from``; the
text-only logits must equal the transformers model's own (the independent reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the Qwen2 / Llama reference implementation")

from unimoe.checkpoint import load_model, save_model_folder  # noqa: E402
from unimoe.model.config import AudioLMConfig  # noqa: E402
from unimoe.model.tasks import Batch, Modality, build_task_builder, collate  # noqa: E402
from unimoe.pretrained import PretrainedError, open_pretrained  # noqa: E402
from unimoe.training.init_from import InitFrom, load_initial_weights, read_init_checkpoint  # noqa: E402
from unimoe.training.stages import SpecialistStage  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 96  # the LM's embedding rows; the tokenizer below has fewer ids, as real ones often do
WORDS = "the a calm slow fast piano violin river song voice hello world music quiet loud bright".split()
AUDIO = {"num_codebooks": 4, "codebook_size": 16, "delays": [0, 1, 2, 3], "max_seq_len": 256}
"""The recipe's part of the config: everything else comes from the pretrained model."""


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|endoftext|>"}))


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (biases and norm scales too), so a mis-mapped tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def qwen2(tie: bool = True, **overrides):
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, **overrides)
    return transformers.Qwen2ForCausalLM(cfg)


def llama(rope_scaling, **overrides):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                   max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   rope_scaling=rope_scaling, tie_word_embeddings=False, **overrides)
    return transformers.LlamaForCausalLM(cfg)


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(str(folder), **kwargs)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = qwen2()
    randomise(model, 0)
    return save(model.eval(), tmp_path_factory.mktemp("qwen") / "Qwen2-tiny"), model


def text_batch(ids: torch.Tensor) -> Batch:
    """Text-only positions (no audio), the layout a task builder gives text tokens."""
    B, L = ids.shape
    return Batch(text_ids=ids, audio_codes=torch.zeros(B, 4, L, dtype=torch.long),
                 modality=torch.full((B, L), int(Modality.TEXT)), attention_mask=torch.ones(B, L, dtype=torch.bool),
                 position_ids=torch.arange(L).expand(B, L), labels=None, task_ids=torch.zeros(B, L, dtype=torch.long),
                 lengths=torch.full((B,), L))


def assert_same_text_logits(ours, reference, length: int = 40) -> None:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = ours.eval()(text_batch(ids), logits="none", text_logits=True).text_logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def stage_from(folder, model=None, **kwargs) -> SpecialistStage:
    return SpecialistStage(model=dict(AUDIO) if model is None else model, init_from=str(folder), **kwargs)


# ---------------------------------------------------------------------- logits parity
def test_qwen2_tied_head_text_logits_equal_transformers(qwen_folder):
    folder, reference = qwen_folder
    stage = stage_from(folder)
    config = stage.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (64, 2, 4, 2)
    assert (config.intermediate_size, config.text_vocab_size, config.rope_theta) == (96, VOCAB, 10000.0)
    assert config.qkv_bias and config.text_head and config.tie_text_head and stage.model.text_head is None
    assert config.text_tokenizer == {"class_path": "hf", "init_args": {"path": str(folder)}}
    assert (config.num_codebooks, config.delays, config.max_seq_len) == (4, [0, 1, 2, 3], 256)  # from the recipe
    assert_same_text_logits(stage.model, reference)
    report = stage.init_report
    assert set(report.not_initialised) == {k for k in stage.model.state_dict() if k.startswith(("audio_", "vision."))}
    assert stage.lineage["init_from"] == {"path": str(folder), "stage": "pretrained"}
    assert stage.lineage["pretrained"]["model_type"] == "qwen2"


def test_sharded_checkpoint_loads_the_same(qwen_folder, tmp_path):
    folder, reference = qwen_folder
    sharded = save(reference, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 3
    a, b = stage_from(folder).model, stage_from(sharded).model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if not name.startswith(("audio_", "vision.")):
            assert torch.equal(x, y), name
    assert_same_text_logits(b, reference)


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_llama_untied_head_and_rope_scaling_equal_transformers(tmp_path, rope_scaling):
    expected = None if rope_scaling is None else dict(rope_scaling)  # transformers adds keys to the dict it is given
    reference = llama(None if rope_scaling is None else dict(rope_scaling))
    randomise(reference, 2)
    folder = save(reference.eval(), tmp_path / "llama")
    stage = stage_from(folder)
    config = stage.config
    assert not config.qkv_bias and not config.tie_text_head and config.head_dim == 32 and config.num_kv_heads == 1
    assert config.rope_scaling == expected
    assert_same_text_logits(stage.model, reference, length=64)  # past the llama3 context of 16


def test_bf16_weights_stream_into_the_fp32_model(tmp_path):
    import copy

    reference = qwen2(tie=False)
    randomise(reference, 3)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())  # the values a bf16 checkpoint holds
    folder = save(copy.deepcopy(reference).to(torch.bfloat16), tmp_path / "bf16")
    stage = stage_from(folder)
    assert stage.model.text_embed.weight.dtype == torch.float32
    assert_same_text_logits(stage.model, reference)  # the same bf16 values, computed in fp32 (the reference
    # keeps its fp32 rotary buffer: casting a transformers model to bf16 and back would round it)


# ---------------------------------------------------------------------- streaming
def test_each_pretrained_tensor_is_read_once_and_alone(qwen_folder):
    folder, _ = qwen_folder
    spec = InitFrom(path=str(folder))
    metadata, tensors = read_init_checkpoint(spec)
    reads: list[str] = []
    files = tensors.files
    original = type(files).__getitem__

    class Counting(type(files)):
        def __getitem__(self, key):
            reads.append(key)
            return original(self, key)

    files.__class__ = Counting
    from unimoe.model.transformer import AudioLM

    model = AudioLM(AudioLMConfig(**{**{f: getattr(metadata.config, f) for f in AUDIO}, **_backbone(metadata)}))
    load_initial_weights(model, spec, tensors)
    assert sorted(reads) == sorted(files)  # every HF tensor exactly once (lm_head is tied: absent)


def _backbone(metadata):
    from unimoe.pretrained import BACKBONE_FIELDS

    return {f: getattr(metadata.config, f) for f in BACKBONE_FIELDS}


# ---------------------------------------------------------------------- after loading
def test_tokenizer_comes_from_the_folder_and_training_and_export_work(qwen_folder, tmp_path):
    folder, reference = qwen_folder
    stage = stage_from(folder, label="t2m")
    builder = build_task_builder("t2m", stage.config)
    seq = builder.build(torch.randint(0, 16, (4, 6)), text="calm slow piano")
    text = seq.text_ids[seq.modality == Modality.TEXT].tolist()
    assert text[-4:] == [WORDS.index("calm") + 2, WORDS.index("slow") + 2, WORDS.index("piano") + 2, 0]  # + eos
    loss = stage.training_step(collate([seq, builder.build(torch.randint(0, 16, (4, 3)), text="violin")]), 0)
    loss.backward()
    assert torch.isfinite(loss) and stage.model.blocks[0].attn.q_proj.bias.grad is not None
    # the trained model keeps its pretrained layout through a model folder
    out = save_model_folder(tmp_path / "model", stage.model, stage.metadata())
    again, meta = load_model(out)
    assert meta.config.tie_text_head and meta.extra["pretrained"]["model_type"] == "qwen2"
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(text_batch(ids), logits="none", text_logits=True).text_logits,
                                   stage.model.eval()(text_batch(ids), logits="none", text_logits=True).text_logits)


def test_recipe_backbone_fields_must_agree_and_presets_give_only_audio_parts(qwen_folder):
    folder, _ = qwen_folder
    with pytest.raises(ValueError, match=r"hidden_size: recipe 512 vs pretrained 64"):
        stage_from(folder, model={**AUDIO, "hidden_size": 512})
    agreeing = stage_from(folder, model={**AUDIO, "hidden_size": 64, "text_tokenizer": {"name": "hf", "path": f"{folder}/"}})
    assert agreeing.config.text_tokenizer == {"name": "hf", "path": f"{folder}/"}  # the recipe's spelling is kept
    preset = stage_from(folder, model="tiny")
    assert preset.config.hidden_size == 64 and preset.config.num_codebooks == 4 and preset.config.vision is not None
    with pytest.raises(ValueError, match="dense model"):
        stage_from(folder, model="tiny-moe")  # a specialist is dense


# ---------------------------------------------------------------------- refusals
def _copy(folder: Path, tmp: Path, name: str) -> Path:
    out = tmp / name
    shutil.copytree(folder, out)
    return out


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_or_broken_pretrained_models_are_refused_clearly(qwen_folder, tmp_path):
    folder, _ = qwen_folder
    cases = {
        "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not supported"),
        "dynamic": ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        "mistral": ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
        "window": ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        "gelu": ({"hidden_act": "gelu"}, "hidden_act"),
        "layers": ({"num_hidden_layers": 3}, "missing: model.layers.2"),
    }
    for name, (changes, message) in cases.items():
        bad = _copy(folder, tmp_path, name)
        _edit_config(bad, **changes)
        with pytest.raises(PretrainedError, match=message) as info:
            open_pretrained(bad)
        assert str(bad) in str(info.value), name

    untokenized = _copy(folder, tmp_path, "no_tokenizer")
    (untokenized / "tokenizer.json").unlink()
    (untokenized / "tokenizer_config.json").unlink()
    with pytest.raises(PretrainedError, match="has no tokenizer"):
        open_pretrained(untokenized)
    pickled = _copy(folder, tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(PretrainedError, match="only pickled weights.*pytorch_model.bin"):
        open_pretrained(pickled)
    foreign = _copy(folder, tmp_path, "extra_tensor")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(foreign / "model.safetensors"))
    save_file({**tensors, "model.layers.0.mlp.router.weight": torch.zeros(4, 64)}, str(foreign / "model.safetensors"))
    with pytest.raises(PretrainedError, match="no place.*mlp.router"):
        open_pretrained(foreign)
    with pytest.raises(PretrainedError, match="not found"):
        open_pretrained(tmp_path / "nowhere")


def test_fit_reports_a_bad_pretrained_folder_in_one_line(qwen_folder, tmp_path):
    import os
    import subprocess
    import sys

    folder, _ = qwen_folder
    bad = _copy(folder, tmp_path, "yarn")
    _edit_config(bad, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    proc = subprocess.run([sys.executable, "-m", "unimoe", "fit", "--model", "SpecialistStage",
                           "--model.init_args.init_from", str(bad), "--data", "boring_stage.BoringData"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent / "helpers")})
    assert proc.returncode == 2 and "'yarn' is not supported" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------- the Hub path
def test_hub_ids_resolve_through_huggingface_hub_and_fail_clearly_offline(qwen_folder, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder, reference = qwen_folder
    calls = []

    def cached(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, local_files_only))
        return str(folder)

    monkeypatch.chdir(tmp_path)  # "Org/tiny-qwen" is not a local path here
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    stage = stage_from("Org/tiny-qwen")
    assert calls and set(calls) == {("Org/tiny-qwen", True)}  # the local Hub cache, no download
    assert stage.config.text_tokenizer == {"class_path": "hf", "init_args": {"path": "Org/tiny-qwen"}}
    assert_same_text_logits(stage.model, reference)

    def offline(repo_id, allow_patterns=None, local_files_only=False, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PretrainedError, match=r"Qwen/Qwen2.5-3B: no such local folder.*offline.*--local-dir /models/Qwen2.5-3B"):
        open_pretrained("Qwen/Qwen2.5-3B")


# ---------------------------------------------------------------------- real configs and the recipe
QWEN25_3B = {  # Qwen/Qwen2.5-3B config.json (the older format: rope_theta, no rope_parameters)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 32768, "max_window_layers": 36, "model_type": "qwen2", "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
LLAMA32_3B = {  # meta-llama/Llama-3.2-3B config.json (older format: rope_scaling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 24, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "vocab_size": 128256,
}


def test_real_qwen25_and_llama32_configs_map_onto_the_backbone(tmp_path):
    from unimoe.pretrained.hf_config import backbone_from_hf

    write_tokenizer(tmp_path)
    qwen = backbone_from_hf(QWEN25_3B, tmp_path)
    assert qwen == {"hidden_size": 2048, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2, "head_dim": None,
                    "intermediate_size": 11008, "qkv_bias": True, "norm_eps": 1e-6, "rope_theta": 1e6,
                    "rope_scaling": None, "text_tokenizer": {"class_path": "hf", "init_args": {"path": str(tmp_path)}},
                    "text_vocab_size": 151936, "text_head": True, "tie_text_head": True}
    with pytest.raises(ValueError, match="tie_text_head needs text_head"):
        AudioLMConfig(tie_text_head=True)
    llama_ = backbone_from_hf(LLAMA32_3B, tmp_path)
    assert (llama_["head_dim"], llama_["num_kv_heads"], llama_["qkv_bias"], llama_["tie_text_head"]) == (None, 8, False, True)
    assert llama_["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_paper_qwen_recipe_fits_qwen25_3b(tmp_path):
    """recipes/paper/specialist_qwen.yaml after the paper specialist files: a valid LightningCLI config,
    and its model config agrees with Qwen2.5-3B's config.json (no conflict; the backbone is Qwen's)."""
    import yaml

    from unimoe.model.config import model_config
    from unimoe.pretrained import BACKBONE_FIELDS, merge_backbone
    from unimoe.pretrained.hf_config import backbone_from_hf
    from unimoe.training.curriculum import compose_stage, load_curriculum, validate_stage_config

    recipes = Path(__file__).parent.parent / "recipes"
    qwen = tmp_path / "data" / "Qwen2.5-3B"
    qwen.mkdir(parents=True)
    (qwen / "config.json").write_text(json.dumps(QWEN25_3B))
    write_tokenizer(qwen)
    files = [recipes / "demo" / "specialist.yaml", *(recipes / "paper" / f for f in
             ("base.yaml", "specialist.yaml", "specialist_qwen.yaml"))]
    curriculum = tmp_path / "cur.yaml"
    curriculum.write_text(yaml.safe_dump({"name": "q", "stages": [{
        "name": "specialist_t2m", "config": [str(f) for f in files],
        "data": {"init_args": {"sources": {"music": "${data_root}/shards/t2m"}}}}]}))
    cur = load_curriculum(curriculum, data_root=str(tmp_path / "data"))
    cfg = compose_stage(cur, cur.stage("specialist_t2m"))
    validate_stage_config(cfg, cur.stage("specialist_t2m"))
    args = cfg["model"]["init_args"]
    assert args["init_from"] == str(qwen)
    recipe_model = model_config(args["model"])
    merged = merge_backbone(recipe_model, backbone_from_hf(QWEN25_3B, qwen), str(qwen))
    assert (merged.intermediate_size, merged.tie_text_head, merged.num_codebooks, merged.vision["width"]) == (11008, True, 12, 1280)
    assert {f: getattr(merged, f) for f in BACKBONE_FIELDS if f != "text_tokenizer"} == {
        f: v for f, v in backbone_from_hf(QWEN25_3B, qwen).items() if f != "text_tokenizer"}


def test_fine_tuning_a_pretrained_specialist_end_to_end(qwen_folder, tmp_path_factory, tmp_path):
    """Lightning fit from the Qwen folder on real tiny shards -> final/ -> the model generates."""
    import lightning as L
    from training_helpers import tiny_data

    from unimoe.data.datamodule import UniMoEDataModule
    from unimoe.generation import load_generator
    from unimoe.training.callbacks import StageFinalizer

    folder, _ = qwen_folder
    data = tiny_data(tmp_path_factory.getbasetemp())
    audio = {**AUDIO, "max_seq_len": 1024}
    codec = {"name": "spectral_rvq", "path": str(data / "codec.pt")}
    stage = SpecialistStage(model=audio, init_from=str(folder), codec=codec, label="tts")
    dm = UniMoEDataModule(sources={"tts": str(data / "shards" / "tts")}, max_tokens=2048,
                          model=AudioLMConfig(**audio, text_tokenizer={"name": "hf", "path": str(folder)}))
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0,
                        enable_checkpointing=False, callbacks=[StageFinalizer()])
    embed_before = stage.model.text_embed.weight.detach().clone()
    trainer.fit(stage, dm)
    assert not torch.equal(stage.model.text_embed.weight, embed_before)  # the pretrained weights train
    model, meta = load_model(tmp_path / "final")
    assert meta.stage == "specialist" and meta.config.tie_text_head and meta.extra["pretrained"]["model_type"] == "qwen2"
    from unimoe.generation import GenerationRequest, GenerationSettings

    generator = load_generator(tmp_path / "final", device="cpu", dtype="fp32",
                               settings=GenerationSettings(max_seconds=0.2, seed=0))
    clips = generator.generate([GenerationRequest(id="x", task="tts", text="hello world")])
    assert clips[0].codes.shape[0] == 4 and clips[0].wav is not None


def test_curriculum_init_from_takes_local_folders_and_hub_ids(tmp_path):
    import yaml

    from unimoe.training.curriculum import compose_stage, load_curriculum

    recipes = Path(__file__).parent.parent / "recipes"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    specialist = [str(recipes / "demo" / "specialist.yaml"), str(recipes / "paper" / "base.yaml"),
                  str(recipes / "paper" / "specialist.yaml")]  # as recipes/paper/curriculum.yaml composes it
    stages = [{"name": name, "config": specialist, "init_from": ref,
               "data": {"init_args": {"sources": {"music": "/x"}}}}
              for name, ref in (("local", "models/tiny"), ("hub", "Qwen/Qwen2.5-3B"))]
    (tmp_path / "cur.yaml").write_text(yaml.safe_dump({"name": "q", "stages": stages}))
    cur = load_curriculum(tmp_path / "cur.yaml", data_root=str(tmp_path))
    init = {s.name: compose_stage(cur, s)["model"]["init_args"]["init_from"] for s in cur.stages}
    assert init == {"local": str(tmp_path / "models" / "tiny"), "hub": "Qwen/Qwen2.5-3B"}
