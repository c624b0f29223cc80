"""The shard writer and ``mtx-dist shards``: real JPEG/PNG files made with PIL, real tars read back
with webdataset and with DALI's CPU reader, DALI indices compared with DALI's own ``wds2idx`` tool."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from webdataset.shardlists import expand_urls

from mtx_data_pipelines.dali_index import index_path_for, split_key, write_dali_index
from mtx_data_pipelines.writer import (
    ImageOptions,
    ShardWriterError,
    WriterOptions,
    write_shards,
)
from mtx_data_pipelines.writer.run import ordered_map
from tests.helpers import run_cli


# -- fixtures: real image files ---------------------------------------------------------------
def picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth gradient with a bright square: small JPEG error, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    arr = base + 40 * np.stack([x / w, y / h, (x + y) / (w + h)], -1)
    s = max(2, min(w, h) // 3)
    ox, oy = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
    arr[oy:oy + s, ox:ox + s] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def save(img: Image.Image, path, fmt: str = "JPEG") -> bytes:
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path.read_bytes()


def read_samples(spec: str) -> list[dict]:
    """Every sample of the shards in ``spec``, in order, read by webdataset."""
    urls = expand_urls(spec)
    return list(wds.tarfile_to_samples()([{"url": u} for u in urls]))


def by_source(samples: list[dict]) -> dict[str, dict]:
    return {json.loads(s["json"])["source"]: s for s in samples}


def opts(**kw) -> WriterOptions:
    image = ImageOptions(**{k: kw.pop(k) for k in list(kw) if k in ImageOptions.__dataclass_fields__})
    return WriterOptions(image=image, **kw)


def dali_read_all(tars: list[str], indices: list[str]) -> list[tuple[str, bytes, bytes]]:
    """(key, jpg, txt) of every sample DALI's CPU webdataset reader yields from one epoch."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)  # CPU only
    def pipe():
        jpg, txt = fn.readers.webdataset(paths=tars, index_paths=indices, ext=["jpg", "txt"], name="r",
                                         random_shuffle=False, missing_component_behavior="empty")
        return jpg, txt, fn.get_property(jpg, key="source_info")

    p = pipe()
    p.build()
    n = p.reader_meta("r")["epoch_size"]
    out = []
    for _ in range(n):
        jpg, txt, info = p.run()
        member = bytes(np.array(info[0])).decode().rsplit(":", 1)[-1]  # "<tar>:<offset>:<name>"
        out.append((split_key(member)[0], bytes(np.array(jpg[0])), bytes(np.array(txt[0]))))
    return out


# -- folder of captioned images ---------------------------------------------------------------
@pytest.fixture
def photo_folder(tmp_path):
    """8 good JPEGs (two in a subfolder), 1 good PNG, and one of each kind of bad sample."""
    src = tmp_path / "photos"
    (src / "trip").mkdir(parents=True)
    good = {}
    for i in range(8):
        rel = f"trip/img{i}.jpg" if i < 2 else f"img{i}.jpg"
        data = save(picture(24 + i * 2, 20 + i, i), src / rel)
        caption = f"a photo number {i}"
        (src / rel).with_suffix(".txt").write_text(f"  {caption}\n")
        good[rel] = (data, caption)
    save(picture(30, 30, 99), src / "drawing.png", "PNG")
    (src / "drawing.txt").write_text("a png drawing")
    (src / "broken.jpg").write_bytes(good["img2.jpg"][0][:200])  # truncated JPEG
    (src / "broken.txt").write_text("broken")
    save(picture(20, 20, 50), src / "nocaption.jpg")
    save(picture(20, 20, 51), src / "blank.jpg")
    (src / "blank.txt").write_text("  \n")
    save(picture(20, 20, 52), src / "latin1.jpg")
    (src / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    save(picture(50, 50, 53), src / "huge.jpg")  # 2500 px > --max-pixels 1600
    (src / "huge.txt").write_text("too big")
    (src / "lonely.txt").write_text("caption without an image")
    (src / "notes.md").write_text("not a sample")
    return src, good


INJECTED = {"bad_caption_encoding": 1, "corrupt_image": 1, "empty_caption": 1, "missing_caption": 1,
            "missing_image_file": 1, "too_many_pixels": 1}


def test_folder_to_shards_keeps_every_good_sample_and_counts_rejects(photo_folder, tmp_path):
    src, good = photo_folder
    out = tmp_path / "out"
    m = write_shards(str(src), str(out), opts(samples_per_shard=4, max_pixels=1600))
    assert m["rejected"] == INJECTED
    assert m["ignored_files"] == {"not_an_image_or_caption": 1}
    assert m["totals"]["samples"] == 9 and m["totals"]["candidates"] == 9 + sum(INJECTED.values())
    assert [s["samples"] for s in m["shards"]] == [4, 4, 1]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejected) == ["blank.jpg", "broken.jpg", "huge.jpg", "latin1.jpg",
                                                      "lonely.txt", "nocaption.jpg"]

    samples = read_samples(m["spec"])
    assert len(samples) == 9 and len({s["__key__"] for s in samples}) == 9
    got = by_source(samples)
    for rel, (data, caption) in good.items():  # passthrough: the very bytes of the file
        assert got[rel]["jpg"] == data and got[rel]["txt"].decode() == caption
    png = got["drawing.png"]  # not JPEG: converted, pixels close to the PNG's
    assert "png" not in png and Image.open(io.BytesIO(png["jpg"])).format == "JPEG"
    diff = np.abs(np.asarray(Image.open(io.BytesIO(png["jpg"])), float) - np.asarray(picture(30, 30, 99), float))
    assert diff.mean() < 3.0

    for s in m["shards"]:  # manifest facts are the files' facts
        path = out / s["name"]
        assert os.path.getsize(path) == s["bytes"] and hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        assert (out / s["index"]).exists()
    assert [os.path.basename(u) for u in expand_urls(m["spec"])] == [s["name"] for s in m["shards"]]
    assert not [n for n in os.listdir(out) if "tmp" in n]

    kept = write_shards(str(src), str(tmp_path / "kept"), opts(keep_format=True, max_pixels=1600))
    png = by_source(read_samples(kept["spec"]))["drawing.png"]
    assert png["png"] == (src / "drawing.png").read_bytes() and "jpg" not in png


def test_interrupted_run_leaves_only_complete_shards(photo_folder, tmp_path):
    src, _ = photo_folder
    out = tmp_path / "out"

    def stop_after_seven(seen: int, written: int) -> None:
        if written == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(str(src), str(out), opts(samples_per_shard=3, max_pixels=1600), progress=stop_after_seven)
    assert sorted(os.listdir(out)) == ["shard-000000.idx", "shard-000000.tar", "shard-000001.idx",
                                       "shard-000001.tar"]  # the third shard was in progress: gone
    assert len(read_samples(str(out / "shard-{000000..000001}.tar"))) == 6

    with pytest.raises(ShardWriterError, match="--overwrite"):
        write_shards(str(src), str(out), opts(samples_per_shard=3, max_pixels=1600))
    m = write_shards(str(src), str(out), opts(samples_per_shard=5, max_pixels=1600, overwrite=True))
    assert [s["name"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["shard-000000.tar", "shard-000001.tar"]


# -- tables -------------------------------------------------------------------------------------
@pytest.fixture
def table_rows(tmp_path):
    """12 good rows (images in a subfolder, one by absolute path) and 5 bad ones, as dicts."""
    img_dir = tmp_path / "tables" / "images"
    img_dir.mkdir(parents=True)
    rows, expected = [], {}
    for i in range(12):
        data = save(picture(28, 22, 200 + i), img_dir / f"{i:03d}.jpg")
        path = str(img_dir / f"{i:03d}.jpg") if i == 5 else f"images/{i:03d}.jpg"
        rows.append({"image": path, "caption": f"caption of image {i}", "label": str(i % 3), "note": f"n{i}"})
        expected[f"caption of image {i}"] = (data, i % 3)
    rows += [
        {"image": "images/000.jpg", "caption": "label is text", "label": "abc", "note": ""},
        {"image": "images/001.jpg", "caption": "label is missing", "label": "", "note": ""},
        {"image": "images/nothere.jpg", "caption": "no such file", "label": "1", "note": ""},
        {"image": "images/002.jpg", "caption": "", "label": "1", "note": ""},
        {"image": "https://example.com/a.jpg", "caption": "remote", "label": "1", "note": ""},
    ]
    return tmp_path / "tables", rows, expected


TABLE_REJECTS = {"bad_label": 1, "missing_label": 1, "missing_image_file": 1, "empty_caption": 1,
                 "remote_image_url": 1}


def check_table_output(m: dict, expected: dict, rejects: dict) -> list[tuple]:
    assert m["rejected"] == rejects
    samples = read_samples(m["spec"])
    assert len(samples) == len(expected)
    for s in samples:
        data, label = expected[s["txt"].decode()]
        assert s["jpg"] == data and s["cls"] == str(label).encode("ascii")
        assert json.loads(s["json"])["label"] == label
    return [(s["jpg"], s["txt"], s["cls"]) for s in samples]


def test_csv_tsv_parquet_tables_write_labels_and_split_shards(table_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, rows, expected = table_rows
    # CSV with OpenCLIP-style column names, found without options
    with open(folder / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label", "note"])
        w.writerows([[r["image"], r["caption"], r["label"], r["note"]] for r in rows])
    with open(folder / "data.csv", "ab") as f:  # one row that is not UTF-8: rejected alone
        f.write("images/003.jpg,café,1,x\r\n".encode("latin-1"))
    m = write_shards(str(folder / "data.csv"), str(tmp_path / "csv"), opts(label_column="label",
                                                                           samples_per_shard=5))
    assert m["source"]["columns"] == {"image": "filepath", "caption": "title", "label": "label"}
    assert [s["samples"] for s in m["shards"]] == [5, 5, 2]
    from_csv = check_table_output(m, expected, {**TABLE_REJECTS, "bad_caption_encoding": 1})
    assert json.loads(read_samples(m["spec"])[0]["json"])["note"] == "n0"  # other columns travel along
    assert "note" not in m["source"]  # the label column was used
    # the same table without --label-column: no KEY.cls, and the writer says why (summary included)
    from mtx_dist.commands.shards import summary
    m = write_shards(str(folder / "data.csv"), str(tmp_path / "csv-nolabel"), opts(samples_per_shard=5))
    assert all("cls" not in s for s in read_samples(m["spec"]))
    assert "pass --label-column label" in m["source"]["note"] and "note: column 'label'" in summary(m)

    # TSV with its own column names, named explicitly
    with open(folder / "data.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["pic", "words", "y"])
        w.writerows([[r["image"], r["caption"], r["label"]] for r in rows])
    m = write_shards(str(folder / "data.tsv"), str(tmp_path / "tsv"),
                     opts(image_column="pic", caption_column="words", label_column="y"))
    assert check_table_output(m, expected, TABLE_REJECTS) == from_csv

    # parquet with an integer label column (nulls for missing labels; no room for "abc")
    kept = [r for r in rows if r["label"] != "abc"]
    pq.write_table(pa.table({
        "image_path": [r["image"] for r in kept], "text": [r["caption"] for r in kept],
        "label": pa.array([int(r["label"]) if r["label"] else None for r in kept], pa.int64())}),
        folder / "data.parquet")
    m = write_shards(str(folder / "data.parquet"), str(tmp_path / "pq"), opts(label_column="label"))
    assert check_table_output(m, expected, {k: v for k, v in TABLE_REJECTS.items() if k != "bad_label"}) == from_csv

    # parquet holding the images themselves, as Hugging Face datasets exports them
    embedded = [(expected[f"caption of image {i}"][0], f"caption of image {i}") for i in (4, 7)]
    pq.write_table(pa.table({
        "image": [{"bytes": data, "path": None} for data, _ in embedded], "text": [c for _, c in embedded]}),
        folder / "embedded.parquet")
    em = write_shards(str(folder / "embedded.parquet"), str(tmp_path / "emb"), opts())
    assert [(s["jpg"], s["txt"].decode()) for s in read_samples(em["spec"])] == embedded

    shuffled = [write_shards(str(folder / "data.csv"), str(tmp_path / f"shuffled{i}"),
                             opts(label_column="label", shuffle=True, seed=3)) for i in range(2)]
    a, b = (read_samples(m["spec"]) for m in shuffled)
    assert [s["txt"] for s in a] == [s["txt"] for s in b]  # same seed, same order
    assert [s["txt"] for s in a] != [s["txt"] for s in read_samples(m["spec"])]
    assert sorted(s["txt"] for s in a) == sorted(s["txt"] for s in read_samples(m["spec"]))

    with pytest.raises(ShardWriterError, match="no label column 'grade'"):
        write_shards(str(folder / "data.csv"), str(tmp_path / "x"), opts(label_column="grade"))


def _footprint(idx_line: str) -> int:
    parts = idx_line.split()
    sizes = [int(parts[i + 2]) for i in range(0, len(parts), 4)]
    return sum(512 + -(-s // 512) * 512 for s in sizes)


def test_max_shard_bytes_cuts_before_the_limit(table_rows, tmp_path):
    folder, rows, _ = table_rows
    with open(folder / "good.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows[:12])
    limit = 3 * 10240
    m = write_shards(str(folder / "good.csv"), str(tmp_path / "b"), opts(max_shard_bytes=limit))
    shards = m["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 12
    out = tmp_path / "b"
    for this, nxt in zip(shards, shards[1:] + [None]):
        assert os.path.getsize(out / this["name"]) <= limit
        if nxt is None:
            break
        lines = (out / this["index"]).read_text().splitlines()
        last = lines[-1].split()
        used = int(last[-3]) + -(-int(last[-2]) // 512) * 512  # end of this shard's last member
        first_next = (out / nxt["index"]).read_text().splitlines()[1]
        # the next sample (plus end blocks, padded to a record) would not have fitted
        assert -(-(used + _footprint(first_next) + 1024) // 10240) * 10240 > limit
    both = write_shards(str(folder / "good.csv"), str(tmp_path / "c"), opts(max_shard_bytes=limit,
                                                                           samples_per_shard=2))
    assert [s["samples"] for s in both["shards"]] == [2] * 6  # the count limit came first


# -- re-encoding, worker count ------------------------------------------------------------------
@pytest.mark.slow
def test_reencode_bounds_the_side_and_output_is_the_same_for_any_worker_count(photo_folder, tmp_path):
    src, _ = photo_folder
    for i, (w, h) in enumerate([(64, 48), (30, 60), (16, 12), (48, 48)]):
        save(picture(w, h, 300 + i), src / f"size{i}.jpg")
        (src / f"size{i}.txt").write_text(f"{w}x{h}")
    common = {"reencode": True, "max_side": 24, "jpeg_quality": 80, "max_pixels": 4000, "samples_per_shard": 5,
              "chunk_size": 2}
    m1 = write_shards(str(src), str(tmp_path / "w1"), opts(workers=1, **common))
    m2 = write_shards(str(src), str(tmp_path / "w2"), opts(workers=2, **common))
    assert m1["rejected"] == m2["rejected"] == {k: v for k, v in INJECTED.items() if k != "too_many_pixels"}
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    for name in os.listdir(tmp_path / "w1"):
        if name != "manifest.json":
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name

    samples = read_samples(m1["spec"])
    assert len(samples) == m1["totals"]["samples"] == 14
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        assert img.format == "JPEG" and max(img.size) <= 24
        if max(meta["width"], meta["height"]) > 24:  # downscaled, aspect kept to a pixel
            assert max(img.size) == 24
            assert abs(img.width / img.height - meta["width"] / meta["height"]) < 2 / min(img.size)
        else:
            assert img.size == (meta["width"], meta["height"])


def _slow_square(chunk: list[int]) -> list[int]:
    import time

    if 7 in chunk:
        time.sleep(120)  # a worker stuck in a read
    time.sleep(0.01 * (len(chunk) % 3))  # chunks finish out of order
    return [x * x for x in chunk]


@pytest.mark.slow
def test_worker_pool_keeps_input_order_and_a_stuck_worker_times_out():
    chunks = [[i, i + 100] for i in range(0, 40, 2) if i != 6] + [[1], [3, 5, 9]]
    got = list(ordered_map(_slow_square, chunks, workers=2, timeout=60))
    assert got == [x * x for c in chunks for x in c]
    with pytest.raises(TimeoutError):
        list(ordered_map(_slow_square, [[1], [7], [2]], workers=2, timeout=2))


# -- DALI index ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_dali_index_equals_dali_tool_and_dali_reads_every_written_sample(photo_folder, tmp_path):
    src, _ = photo_folder
    m = write_shards(str(src), str(tmp_path / "out"), opts(samples_per_shard=4, max_pixels=1600))
    tars = [str(tmp_path / "out" / s["name"]) for s in m["shards"]]
    wds2idx = shutil.which("wds2idx")  # DALI's own indexer, installed with nvidia-dali
    assert wds2idx, "nvidia-dali's wds2idx script is not on PATH"
    for t in tars:
        ref = str(tmp_path / "ref.idx")
        subprocess.run([wds2idx, t, ref], check=True, capture_output=True, timeout=60)
        assert Path(index_path_for(t)).read_text() == Path(ref).read_text()

    written = read_samples(m["spec"])
    got = dali_read_all(tars, [index_path_for(t) for t in tars])
    assert [k for k, _, _ in got] == [s["__key__"] for s in written]
    assert all(j == s["jpg"] and t == s["txt"] for (_, j, t), s in zip(got, written))


def _wds_tar(path, samples: list[tuple[str, dict]], mtime: float | None = None) -> None:
    """A tar as webdataset writes it; without ``mtime`` every member gets a PAX header for its
    fractional time, so data offsets are not simply multiples of two blocks."""
    with wds.TarWriter(str(path), encoder=False, mtime=mtime) as w:
        for key, files in samples:
            w.write({"__key__": key, **files})


@pytest.mark.slow
def test_existing_webdataset_folder_is_indexed_in_place(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    jpgs = [save(picture(24, 24, 400 + i), tmp_path / "x.jpg") for i in range(10)]
    good = [(f"{i:09d}", {"jpg": jpgs[i], "txt": f"text {i}".encode(), "json": b"{}"}) for i in range(10)]
    bad_image = ("000000010", {"jpg": b"garbage", "txt": b"bad image", "json": b"{}"})
    no_text = ("000000011", {"jpg": jpgs[0], "json": b"{}"})
    _wds_tar(src / "00000.tar", good[:5] + [bad_image])
    _wds_tar(src / "00001.tar", good[5:] + [no_text])
    whole = (src / "00000.tar").read_bytes()
    (src / "00002.tar").write_bytes(whole[:3000])  # cut inside a member
    (src / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 12, "failed_to_download": 3}))
    before = {n: (src / n).read_bytes() for n in os.listdir(src)}

    m = write_shards(str(src), str(tmp_path / "index"), opts())
    assert m["source"]["kind"] == "wds"
    assert {n: (src / n).read_bytes() for n in os.listdir(src)} == before  # nothing rewritten
    assert m["rejected"] == {"corrupt_image": 1, "missing_caption": 1}
    bad = [json.loads(x) for x in (tmp_path / "index" / "rejected.jsonl").read_text().splitlines()]
    assert [(b["source"], b["reason"]) for b in bad] == [("00000.tar:000000010", "corrupt_image"),
                                                         ("00001.tar:000000011", "missing_caption")]
    assert [(s["name"], s["samples"], s["bad_samples"]) for s in m["shards"][:2]] == [("00000.tar", 6, 1),
                                                                                      ("00001.tar", 6, 1)]
    assert "truncated" in m["shards"][2]["error"] and m["shards"][2]["index"] is None
    assert m["totals"]["bad_shards"] == 1 and m["totals"]["samples"] == 12
    assert m["source_stats"] == {"stats_files": 1, "count": 12, "successes": 12, "failed_to_download": 3}
    assert expand_urls(m["spec"]) == [str(src / "00000.tar"), str(src / "00001.tar")]

    tars = expand_urls(m["spec"])
    indices = [s["index"] for s in m["shards"][:2]]
    got = dali_read_all(tars, indices)
    expected = good[:5] + [bad_image] + good[5:] + [no_text]
    assert [k for k, _, _ in got] == [k for k, _ in expected]
    assert [(j, t) for _, j, t in got] == [(f["jpg"], f.get("txt", b"")) for _, f in expected]


def test_write_dali_index_default_path_and_filter(tmp_path):
    _wds_tar(tmp_path / "a.tar", [("k1", {"jpg": b"12", "txt": b"x"}), ("d/k2", {"jpg": b"3", "cls": b"1"})],
             mtime=0)
    path = write_dali_index(str(tmp_path / "a.tar"))
    assert path == str(tmp_path / "a.idx")
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "v1.2 2" and lines[1] == "jpg 512 2 k1.jpg txt 1536 1 k1.txt"
    assert lines[2].split()[0::4] == ["cls", "jpg"] and lines[2].split()[3] == "d/k2.cls"
    only_jpg = write_dali_index(str(tmp_path / "a.tar"), str(tmp_path / "j.idx"), exts=["jpg"])
    assert Path(only_jpg).read_text().splitlines()[1:] == ["jpg 512 2 k1.jpg", "jpg 3584 1 d/k2.jpg"]


# -- the command --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_2(photo_folder, tmp_path):
    src, _ = photo_folder
    res = run_cli(["shards", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")],
                  cwd=str(tmp_path), timeout=60)
    assert res.returncode == 2 and "ShardWriterError" in res.stderr and "does not exist" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli(["shards", "--input", str(src), "--output", str(tmp_path / "o"), "--samples-per-shard", "0"],
                  cwd=str(tmp_path), timeout=60)
    assert res.returncode == 2 and "--samples-per-shard must be >= 1" in res.stderr
    res = run_cli(["shards", "--input", str(src), "--output", str(tmp_path / "o"), "--max-shard-bytes", "lots"],
                  cwd=str(tmp_path), timeout=60)
    assert res.returncode == 2 and "not a byte size" in res.stderr


@pytest.mark.slow
def test_end_to_end_csv_with_labels_to_shards_to_training(tmp_path):
    from mtx_data_pipelines.demo import COMBINATIONS, TEMPLATES, caption, render

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        for i in range(64):
            scene = COMBINATIONS[int(rng.integers(len(COMBINATIONS)))]
            render(*scene, px=40, rng=rng).save(tmp_path / "imgs" / f"{i}.jpg", quality=90)
            w.writerow([f"imgs/{i}.jpg", caption(*scene, template=i % len(TEMPLATES)), i % 4])
    res = run_cli(["shards", "--input", "pairs.csv", "--output", "shards", "--label-column", "label",
                   "--samples-per-shard", "16", "--workers", "2"], cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    spec = str(tmp_path / "shards" / "shard-{000000..000003}.tar")
    assert "wrote 64 samples in 4 shards" in res.stdout and "rejected: 0" in res.stdout
    assert f"data.train={spec}" in res.stdout
    assert all(s["cls"] == str(i % 4).encode() for i, s in enumerate(read_samples(spec)))

    res = run_cli(["train", f"data.train={spec}", f"data.val={spec}", "model.preset=micro", "run.steps=4",
                   "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=16", "tracking.enabled=false",
                   "run.export_at_end=false", "optim.warmup_steps=1"],
                  cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trained to step 4 of 4" in res.stdout
