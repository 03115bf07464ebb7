"""Shard dataset, exact sequence lengths, and the DataModule: mixes, budgets, task ids, codec checks."""

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from test_tokenize import FrameEnergyCodec, tone
from unimoe.data.datamodule import UniMoEDataModule
from unimoe.data.dataset import DrawnDataset, ShardDataset
from unimoe.data.manifest import ManifestEntry, write_manifest
from unimoe.data.sequences import SequenceMaker
from unimoe.data.shards import CodecMismatchError, ShardError
from unimoe.data.tokenize import TokenizeConfig, tokenize_manifest
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import Modality, TaskIds

MODEL = AudioLMConfig.from_preset("tiny", num_codebooks=2, codebook_size=64, delays=[0, 1], max_seq_len=1024)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    speech, music, video = [], [], []
    for i in range(24):
        split = "val" if i in (3, 4) else "train"
        speech.append(ManifestEntry(id=f"sp{i}", task="tts", audio=tone(root / f"sp{i}.wav", rng.uniform(0.6, 1.6), 200 + 10 * i),
                                    text="word " * int(rng.integers(1, 12)), speaker=f"s{i % 3}", split=split))
    for i, e in enumerate(speech):
        other = speech[(i + 3) % len(speech)]
        e.prompt_audio, e.prompt_text = other.audio, other.text.strip()
    for i in range(8):
        music.append(ManifestEntry(id=f"mu{i}", task="t2m", audio=tone(root / f"mu{i}.wav", rng.uniform(1, 3), 300 + 20 * i),
                                   text=f"a calm piece number {i}", split="val" if i == 0 else "train"))
    for i in range(5):
        frames = rng.integers(0, 255, (int(rng.integers(6, 20)), 24, 24, 3), dtype=np.uint8)
        np.save(root / f"v{i}.npy", frames)
        video.append(ManifestEntry(id=f"vi{i}", task="v2m", audio=tone(root / f"vi{i}.wav", rng.uniform(1, 3), 400 + 20 * i),
                                   text=f"music for a video {i}", video=str(root / f"v{i}.npy"), split="val" if i == 0 else "train"))
    out = {}
    for name, entries in (("speech", speech), ("music", music), ("video", video)):
        m = write_manifest(root / f"{name}.jsonl", entries)
        out[name] = str(root / "shards" / name)
        tokenize_manifest(m, FrameEnergyCodec(), out[name], config=TokenizeConfig(shard_size=5), progress=False)
    return out


def test_dataset_reads_shards_by_split(shards):
    train = ShardDataset(shards["speech"], split="train")
    val = ShardDataset(shards["speech"], split="val")
    assert len(train) == 22 and len(val) == 2 and {val[i].id for i in range(2)} == {"sp3", "sp4"}
    ex = train[5]
    assert ex.task == "tts" and ex.codes.dtype == torch.long and ex.codes.shape[0] == 2 and ex.prompt_codes is not None
    assert ex.id == train.row(5)["id"] and ex.codes.shape[1] == train.row(5)["frames"]
    v = ShardDataset(shards["video"], split=None)[1]
    assert v.video.dtype == torch.uint8 and v.video.shape[1:] == (3, 24, 24)
    with pytest.raises(CodecMismatchError, match="hop_length: shards 320 vs expected 160"):
        ShardDataset(shards["speech"], expected_codec=FrameEnergyCodec(hop_length=160).describe())


def test_lengths_are_exact(shards):
    ids = TaskIds(["v2m", "tts", "t2m"])  # any table: the builders number their sequences with it
    maker = SequenceMaker(MODEL, cond_drop_prob=0.0, task_ids=ids)
    for name in shards:
        ds = ShardDataset(shards[name], split=None)
        for i in range(len(ds)):
            seq = maker.sequence(ds[i])
            assert len(seq) == maker.length(ds.row(i)), ds.row(i)["id"]
            assert seq.task_id == ids[ds.row(i)["task"]]


def test_condition_drop_shortens_training_sequences_only(shards):
    ds = ShardDataset(shards["music"], split=None)
    always = SequenceMaker(MODEL, cond_drop_prob=1.0, train=True)
    never = SequenceMaker(MODEL, cond_drop_prob=1.0, train=False)
    caption_tokens = len(ds[0].text.encode())
    assert len(never.sequence(ds[0])) - len(always.sequence(ds[0])) == caption_tokens


def _module(shards, **kw):
    args = dict(sources=shards, model=MODEL, max_tokens=600, cond_drop_prob=0.0, seed=1)
    args.update(kw)
    dm = UniMoEDataModule(**args)
    dm.setup("fit")
    return dm


def test_train_batches_budget_and_per_token_task_ids(shards):
    dm = _module(shards, mix="balanced", temperature=2.0)
    loader = dm.train_dataloader()
    planned = list(loader.batch_sampler)
    data = dm._data["train"]
    task_of = [t for n in data.names for t in data.datasets[n].tasks]
    seen = set()
    for indices, batch in zip(planned, loader):
        assert batch.batch_size * batch.seq_len <= 600
        for b, draw in enumerate(indices):  # the training batch sampler yields Draws (index, epoch, position)
            n, idx = int(batch.lengths[b]), draw.index
            assert torch.all(batch.task_ids[b, :n] == dm.layout.task_ids[task_of[idx]])
            assert not batch.attention_mask[b, n:].any()
            seen.add(task_of[idx])
        if batch.video is not None:
            rows_with_vision = (batch.modality == Modality.VISION).any(1).sum()
            assert batch.video.shape[0] == rows_with_vision
    assert seen == {"tts", "t2m", "v2m"}
    assert len(planned) == len(loader)


def test_mix_proportions_follow_the_requested_weights(shards):
    dm = _module(shards, mix="balanced", weights={"speech": 1.0, "music": 1.0, "video": 2.0}, samples_per_epoch=4000)
    sampler = dm.train_batch_sampler().sampler
    data = dm._data["train"]
    counts = np.bincount(sampler.draw_sources(), minlength=3)
    p = np.array([0.25, 0.25, 0.5])
    # binomial 5-sigma bound per source
    assert np.all(np.abs(counts - 4000 * p) <= 5 * np.sqrt(4000 * p * (1 - p)))
    raw = _module(shards, mix="raw").train_probabilities()
    assert raw == pytest.approx({"speech": 22 / 33, "music": 7 / 33, "video": 4 / 33})
    assert data.names == ["speech", "music", "video"]


def test_seed_mix_draws_a_small_balanced_subset(shards):
    dm = _module(shards, mix="seed", seed_size=9)
    bs = dm.train_batch_sampler()
    data = dm._data["train"]
    drawn = [d.index for b in bs for d in b]
    assert len(drawn) == 9
    owner = np.searchsorted(np.array(data.offsets), drawn, side="right") - 1
    assert np.bincount(owner, minlength=3).tolist() == [3, 3, 3]
    bs.set_epoch(1)
    assert sorted(d.index for b in bs for d in b) == sorted(drawn)  # same subset every epoch


def test_validation_uses_every_example_once_without_drop(shards):
    dm = _module(shards, cond_drop_prob=1.0)
    loader = dm.val_dataloader()
    data = dm._data["val"]
    assert sorted(i for b in loader.batch_sampler for i in b) == list(range(4))
    total = sum(int(b.lengths.sum()) for b in loader)
    assert total == sum(int(x) for x in data.all_lengths)  # full conditions: nothing dropped


def test_codec_and_model_mismatches_are_refused(shards):
    with pytest.raises(CodecMismatchError, match="the model expects 4 of 16"):
        _module(shards, model="tiny")
    with pytest.raises(CodecMismatchError, match="hop_length"):
        _module(shards, codec=FrameEnergyCodec(hop_length=160).describe())
    with pytest.raises(ShardError, match="not a finished shard directory"):
        _module({"x": str(shards["speech"]) + "-missing"})


def test_configurable_from_yaml(shards):
    parser = ArgumentParser()
    parser.add_class_arguments(UniMoEDataModule, "data")
    cfg = parser.parse_object(yaml.safe_load(f"""
data:
  sources: {{speech: {shards['speech']}, music: [{shards['music']}]}}
  model: {{num_codebooks: 2, codebook_size: 64, delays: [0, 1], hidden_size: 64, num_layers: 1, num_heads: 2,
          num_kv_heads: 1, intermediate_size: 64, max_seq_len: 512}}
  mix: balanced
  weights: {{speech: 3, music: 1}}
  max_tokens: 700
"""))
    dm = parser.instantiate(cfg).data
    dm.setup("fit")
    assert dm.train_probabilities() == pytest.approx({"speech": 0.75, "music": 0.25})
    batch = next(iter(dm.train_dataloader()))
    assert batch.batch_size * batch.seq_len <= 700


def test_worker_processes_give_the_same_batches(shards):
    batches = []
    for workers in (0, 2):
        dm = _module(shards, num_workers=workers)
        batches.append([(b.audio_codes, b.task_ids, b.text_ids) for b in dm.train_dataloader()])
    assert len(batches[0]) == len(batches[1])
    for a, b in zip(*batches):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_runs_under_a_lightning_trainer_and_reshuffles_each_epoch(shards):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch.audio_codes.sum().item())
            return (self.w - batch.audio_codes.float().mean()) ** 2

        def validation_step(self, batch, batch_idx):
            self.log("val", batch.lengths.float().mean(), batch_size=batch.batch_size)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = UniMoEDataModule(sources=shards, model=MODEL, max_tokens=600, mix="balanced", seed=2)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(probe, datamodule=dm)
    assert len(probe.seen[0]) > 0 and probe.seen[0] != probe.seen[1]


def test_several_directories_form_one_source(shards, tmp_path):
    both = ShardDataset([shards["speech"], shards["music"]], split=None)
    assert len(both) == 24 + 8 and both[30].id == "mu6" and both[0].id == "sp0"
    m = write_manifest(tmp_path / "m.jsonl", [ManifestEntry(id="x", task="t2m", audio=tone(tmp_path / "x.wav", 1.0), text="x")])
    tokenize_manifest(m, FrameEnergyCodec(hop_length=160), tmp_path / "other", progress=False)
    with pytest.raises(CodecMismatchError, match="hop_length"):
        ShardDataset([shards["music"], tmp_path / "other"], split=None)



class DDPProbe(L.LightningModule):
    """Writes, per rank, the codes checksum of every training batch (module level: picklable for spawn);
    with condition dropping on, it also shows that each rank dropped the same examples' conditions."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        with open(f"{self.out_dir}/rank{self.global_rank}.txt", "a") as fh:
            fh.write(f"{self.current_epoch} {int(batch.audio_codes.sum())} {batch.batch_size}\n")
        return (self.w - batch.audio_codes.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_ddp_ranks_get_their_own_equal_share(shards, tmp_path):
    dm = UniMoEDataModule(sources=shards, model=MODEL, max_tokens=600, mix="raw", seed=4, val_split=None, cond_drop_prob=0.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(DDPProbe(tmp_path), datamodule=dm)
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split("\n")[:-1] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    # the two ranks' batches are the two interleaved halves of the single-process plan
    dm.setup("fit")
    plan = list(dm.train_batch_sampler())
    data = dm._data["train"]
    maker = dm.maker(train=True)
    drawn = DrawnDataset(data.concat)  # the draws carry the CFG drop: the same on 1 or 2 ranks
    sums = [int(maker([drawn[d] for d in b]).audio_codes.sum()) for b in plan]
    assert [int(l.split()[1]) for l in ranks[0]] == sums[0::2][: len(ranks[0])]
    assert [int(l.split()[1]) for l in ranks[1]] == (sums[1::2] + sums[:1])[: len(ranks[1])]



def test_ddp_with_lightning_distributed_sampler_is_refused(shards):
    from types import SimpleNamespace

    dm = _module(shards)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(RuntimeError, match="use_distributed_sampler=False"):
        dm.train_dataloader()
    dm.trainer._accelerator_connector.use_distributed_sampler = False
    assert dm.train_dataloader().batch_sampler.rank == 1


def test_without_a_stage_the_data_module_needs_a_model(shards):
    dm = UniMoEDataModule(sources=shards, max_tokens=600)
    with pytest.raises(ValueError, match="no model to lay sequences out for: attach it to a unimoe training stage"):
        dm.setup("fit")
    dm = UniMoEDataModule(sources=shards, model={"preset": "tiny", "num_codebooks": 2, "codebook_size": 64,
                                                  "delays": [0, 1], "max_seq_len": 1024}, max_tokens=600)
    dm.setup("validate")
    assert dm.layout.config == MODEL and dm.layout.task_ids.names == sorted(dm.data_tasks())
