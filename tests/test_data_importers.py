"""Importers on small synthetic LibriSpeech / LibriTTS / caption trees."""

import numpy as np
import pytest
import soundfile as sf

from unimoe.data.importers import ImportFormatError, import_captions, import_librispeech
from unimoe.data.manifest import read_manifest

SR = 16000


def tone(path, seconds, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(SR * seconds)) / SR
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 220 * t), SR, format=fmt)


def make_librispeech(root):
    # subset/speaker/chapter/{spk-chap-utt.flac, spk-chap.trans.txt}
    layout = {("train-clean-100", "19", "198"): [1.0, 2.0, 3.0], ("train-clean-100", "26", "495"): [1.5], ("dev-clean", "84", "121"): [2.0, 2.5]}
    for (subset, spk, chap), durations in layout.items():
        folder = root / subset / spk / chap
        lines = []
        for i, d in enumerate(durations):
            utt = f"{spk}-{chap}-{i:04d}"
            tone(folder / f"{utt}.flac", d, fmt="FLAC")
            lines.append(f"{utt} WORD NUMBER {i}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    # an utterance listed but without audio: reported, not fatal
    with open(root / "train-clean-100" / "19" / "198" / "19-198.trans.txt", "a") as fh:
        fh.write("19-198-0099 NO AUDIO HERE\n")


def test_librispeech_import(tmp_path):
    make_librispeech(tmp_path / "LibriSpeech")
    report = import_librispeech(tmp_path / "LibriSpeech", tmp_path / "m.jsonl", seed=3)
    entries = {e.id: e for e in read_manifest(tmp_path / "m.jsonl", check_files=True, tasks=("tts",))}
    assert len(entries) == 6 and report.entries == 6
    assert report.skipped == [(str(tmp_path / "LibriSpeech/train-clean-100/19/198/19-198-0099.flac"), "missing audio file")]
    e = entries["19-198-0001"]
    assert e.text == "WORD NUMBER 1" and e.speaker == "19" and e.split == "train" and e.task == "tts"
    assert e.duration == pytest.approx(2.0, abs=1e-3)
    assert entries["84-121-0000"].split == "val"
    # prompts: another utterance of the same speaker, same split; lone speaker gets none
    for entry in entries.values():
        if entry.speaker == "26":
            assert entry.prompt_audio is None
            continue
        assert entry.prompt_audio and entry.prompt_audio != entry.audio
        prompt = next(o for o in entries.values() if o.audio == entry.prompt_audio)
        assert prompt.speaker == entry.speaker and prompt.split == entry.split
        assert entry.prompt_text == prompt.text
    assert report.without_prompt == 1 and report.speakers == 3
    # deterministic with the seed
    import_librispeech(tmp_path / "LibriSpeech", tmp_path / "m2.jsonl", seed=3)
    assert (tmp_path / "m.jsonl").read_text() == (tmp_path / "m2.jsonl").read_text()


def test_libritts_import_and_forced_split(tmp_path):
    root = tmp_path / "LibriTTS" / "test-clean"
    for utt, text in [("1089_134686_000001_000001", "He hoped there would be stew."), ("1089_134686_000002_000000", "Stuff it into you!")]:
        tone(root / "1089" / "134686" / f"{utt}.wav", 1.2)
        (root / "1089" / "134686" / f"{utt}.normalized.txt").write_text(text)
        (root / "1089" / "134686" / f"{utt}.original.txt").write_text(text.upper())
    import_librispeech(tmp_path / "LibriTTS", tmp_path / "m.jsonl")
    entries = read_manifest(tmp_path / "m.jsonl", tasks=("tts",))
    assert sorted(e.text for e in entries) == ["He hoped there would be stew.", "Stuff it into you!"]
    assert {e.speaker for e in entries} == {"1089"} and {e.split for e in entries} == {"test"}
    assert entries[0].prompt_audio == entries[1].audio and entries[1].prompt_audio == entries[0].audio
    import_librispeech(tmp_path / "LibriTTS", tmp_path / "m.jsonl", split="train")
    assert {e.split for e in read_manifest(tmp_path / "m.jsonl", tasks=("tts",))} == {"train"}


def test_librispeech_bad_transcript_names_line(tmp_path):
    folder = tmp_path / "ls" / "1" / "2"
    tone(folder / "1-2-0000.flac", 1.0, fmt="FLAC")
    (folder / "1-2.trans.txt").write_text("1-2-0000 OK TEXT\n1-2-0001\n")
    with pytest.raises(ImportFormatError, match=r"1-2\.trans\.txt:2"):
        import_librispeech(tmp_path / "ls", tmp_path / "m.jsonl")


def test_caption_csv_import_musiccaps_style(tmp_path):
    audio = tmp_path / "wav"
    tone(audio / "abc.wav", 4.0)
    tone(audio / "nested" / "def-30-40.wav", 3.0)  # downloader naming <ytid>-<start>-<end>
    tone(audio / "jkl.wav", 2.0)
    (tmp_path / "caps.csv").write_text(
        "ytid,start_s,caption,is_audioset_eval\n"
        'abc,0,"A calm piano, slow.",False\n'
        "def,30,Energetic drums,True\n"
        "ghi,0,Missing audio,False\n"
        "jkl,0,,False\n"
    )
    report = import_captions(tmp_path / "caps.csv", audio, tmp_path / "m.jsonl", split_column="is_audioset_eval")
    entries = {e.id: e for e in read_manifest(tmp_path / "m.jsonl", check_files=True, tasks=("t2m",))}
    assert set(entries) == {"abc", "def"}
    assert entries["abc"].text == "A calm piano, slow." and entries["abc"].split == "train" and entries["abc"].task == "t2m"
    assert entries["def"].split == "test" and entries["def"].audio.endswith("def-30-40.wav")
    assert entries["def"].duration == pytest.approx(3.0, abs=1e-3)
    assert sorted(report.skipped) == [("ghi", "missing audio file"), ("jkl", "empty caption")]


def test_caption_csv_fma_template_and_video(tmp_path):
    tone(tmp_path / "fma" / "000" / "000002.wav", 2.0)
    (tmp_path / "vid").mkdir()
    np.save(tmp_path / "vid" / "2.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "c.csv").write_text("track_id\tcaption\tvideo\tsplit\n2\tfolk guitar\t2.npy\tvalid\n")
    import_captions(tmp_path / "c.csv", tmp_path / "fma", tmp_path / "m.jsonl", id_column="track_id",
                    audio_template="{track_id:0>6}", video_column="video", video_dir=tmp_path / "vid",
                    split_column="split", delimiter="\t")
    (entry,) = read_manifest(tmp_path / "m.jsonl", check_files=True, tasks=("v2m",))
    assert entry.task == "v2m" and entry.split == "val" and entry.video.endswith("2.npy")


def test_caption_csv_errors_name_file_line_and_column(tmp_path):
    (tmp_path / "a").mkdir()
    tone(tmp_path / "a" / "x.wav", 1.0)
    (tmp_path / "c.csv").write_text("ytid,caption\nx,hi\n")
    with pytest.raises(ImportFormatError, match=r"c\.csv:1: no column 'split'"):
        import_captions(tmp_path / "c.csv", tmp_path / "a", tmp_path / "m.jsonl", split_column="split")
    (tmp_path / "c.csv").write_text("ytid,caption,split\nx,hi,train\ny,yo,holdout\n")
    with pytest.raises(ImportFormatError, match=r"c\.csv:3: column 'split': unknown split value 'holdout'"):
        import_captions(tmp_path / "c.csv", tmp_path / "a", tmp_path / "m.jsonl", split_column="split")
