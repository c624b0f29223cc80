"""One sample path: the training loader, `mtx-dist eval` and the shard writer's check of existing
tars accept and skip the same raw samples, under the same reason names (mtx_data_pipelines.records)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from mtx_data_pipelines.loader import Loader, StreamConfig
from mtx_data_pipelines.records import Unusable, caption_text, label_value, parse_sample
from mtx_data_pipelines.writer.existing import check_tar
from mtx_dist.evaluate import iter_samples


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def dirty_shard(tmp_path):
    good = _jpeg()
    samples = [{"__key__": f"ok{i}", "jpg": good, "txt": b"a red square"} for i in range(3)]
    samples += [
        {"__key__": "bom", "jpg": good, "txt": "\ufeff a red square \n".encode()},  # kept, mark stripped
        {"__key__": "corrupt", "jpg": b"\xff\xd8 broken", "txt": b"x"},
        {"__key__": "nocaption", "jpg": good},
        {"__key__": "empty", "jpg": good, "txt": b"   "},
        {"__key__": "latin1", "jpg": good, "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "noimage", "txt": b"orphan caption"},
    ]
    path = str(tmp_path / "dirty-000000.tar")
    with wds.TarWriter(path) as sink:
        for s in samples:
            sink.write(s)
    return path


SKIPPED = Counter(corrupt_image=1, missing_caption=1, empty_caption=1, bad_caption_encoding=1, missing_image=1)


def test_training_loader_eval_and_writer_check_skip_alike(dirty_shard, tmp_path):
    loader = Loader(StreamConfig(dirty_shard, 4, 32, train=False, workers=0))
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == ["bom", "ok0", "ok1", "ok2"]
    assert loader.skipped == SKIPPED

    record = check_tar(dirty_shard, str(tmp_path), max_pixels=10 ** 6)
    assert record["samples"] == 9 and Counter(record["bad"]) == SKIPPED

    # evaluation needs a caption or a label: a missing or empty caption without a label is one reason
    skipped: Counter = Counter()
    got = {s["key"]: s["caption"] for s in iter_samples(dirty_shard, 32, skipped)}
    assert got == {"ok0": "a red square", "ok1": "a red square", "ok2": "a red square", "bom": "a red square"}
    assert skipped == Counter(corrupt_image=1, no_caption_or_label=2, bad_caption_encoding=1, missing_image=1)


def test_eval_keeps_labelled_samples_without_captions(tmp_path):
    path = str(tmp_path / "cls-000000.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "a", "jpg": _jpeg(), "cls": b"3"})
        sink.write({"__key__": "b", "jpg": _jpeg(), "txt": b"  ", "cls": b"1"})
        sink.write({"__key__": "c", "jpg": _jpeg(), "cls": b"three"})
    skipped: Counter = Counter()
    got = [(s["key"], s["caption"], s["label"]) for s in iter_samples(path, 32, skipped)]
    assert got == [("a", None, 3), ("b", None, 1)]
    assert skipped == Counter(bad_label=1)


@pytest.mark.parametrize("raw, reason", [(None, "missing_caption"), (b"\xe9t\xe9", "bad_caption_encoding"),
                                         ("\ufeff \n", "empty_caption"), ("\udce9", "bad_caption_encoding")])
def test_caption_rules_name_their_reason(raw, reason):
    with pytest.raises(Unusable) as e:
        caption_text(raw)
    assert e.value.reason == reason


def test_caption_and_label_values():
    assert caption_text(b"\xef\xbb\xbf  two cats\n") == "two cats"
    assert caption_text(7) == "7"
    assert [label_value(v) for v in (b" 4\n", 5, 6.0, "-2")] == [4, 5, 6, -2]
    for bad, reason in ((b"\xff", "bad_label"), (True, "bad_label"), ("1.5", "bad_label"), ("", "missing_label")):
        with pytest.raises(Unusable) as e:
            label_value(bad)
        assert e.value.reason == reason
    with pytest.raises(Unusable) as e:
        parse_sample({"__key__": "k", "json": b"{}"})
    assert e.value.reason == "unknown_extension"
