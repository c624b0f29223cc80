"""Evaluation: recall@K and zero-shot accuracy against hand computations (ranks, ties, prompt
ensembling), and `mtx-dist eval` end to end against open_clip on the exported model."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mtx_dist.cli import main
from mtx_dist.evaluate import (
    TEMPLATES,
    EvalDataError,
    caption_groups,
    caption_keys,
    chance_recall_at_1,
    class_embeddings,
    read_classnames,
    retrieval_metrics,
    zero_shot_accuracy,
)
from mtx_dist.export import write_export
from mtx_dist.export.source import SourceError, load_any
from tests.helpers import run_cli


def test_recall_at_k_with_known_ranks_and_ties():
    img = torch.tensor([[1.0, 0], [0, 1], [1, 0], [-1, 0]])
    txt = torch.tensor([[1.0, 0], [0, 1], [0, 1], [-1, 0]])
    # image->text ranks of the true caption: 0, 1 (tied with caption 2), 2 (two captions score >= 0), 0
    # text->image ranks of the true image:   1 (tied with image 2), 0, 3 (three images score >= 0), 0
    m = retrieval_metrics(img, txt, ks=(1, 2, 3, 5))
    assert m == pytest.approx({"i2t_recall_at_1": 0.5, "i2t_recall_at_2": 0.75, "i2t_recall_at_3": 1.0,
                               "t2i_recall_at_1": 0.5, "t2i_recall_at_2": 0.75, "t2i_recall_at_3": 0.75},
                              abs=1e-7)  # no K > N


def test_identical_captions_are_one_target():
    """Forty images of "seven" and one caption text for all: a perfect model scores 1.0 once identical
    captions are one target (pairwise recall would count 39 of 40 as misses), and the chance level is
    sum(n_g^2) / N^2."""
    torch.manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 4)
    feats = classes[labels]  # images and captions of a class embed alike: a perfect model
    groups = caption_groups([f"a photo of the digit {int(c)}" for c in labels])
    assert groups.tolist() == labels.tolist()
    m = retrieval_metrics(feats, feats, ks=(1, 5), groups=groups)
    assert m == {"i2t_recall_at_1": 1.0, "i2t_recall_at_5": 1.0, "t2i_recall_at_1": 1.0, "t2i_recall_at_5": 1.0}
    plain = retrieval_metrics(feats, feats, ks=(1,))
    assert plain["i2t_recall_at_1"] == 0.0  # every image ties with its class mates: no hit counted
    assert chance_recall_at_1(groups) == pytest.approx((40 ** 2 + 20 ** 2 + 4 ** 2) / 64 ** 2, rel=1e-12)
    assert chance_recall_at_1(torch.arange(64)) == pytest.approx(1 / 64, rel=1e-12)


def test_grouped_recall_without_repeats_equals_pairwise_and_counts_ties_against():
    torch.manual_seed(1)
    img, txt = torch.randn(50, 16), torch.randn(50, 16)
    txt[3] = txt[7]  # equal features, different captions: a tie that counts against the match
    # the pairwise reference, written out: rank = other items scoring at least the match's score
    sim = img @ txt.t()
    for name, scores in (("i2t", sim), ("t2i", sim.t())):
        ranks = [sum(1 for j in range(50) if j != i and scores[i, j] >= scores[i, i]) for i in range(50)]
        for k in (1, 5, 10):
            want = sum(r < k for r in ranks) / 50
            assert retrieval_metrics(img, txt, groups=torch.arange(50))[f"{name}_recall_at_{k}"] == pytest.approx(want)
    assert retrieval_metrics(img, txt, groups=torch.arange(50)) == retrieval_metrics(img, txt)
    # hand-made: captions 0 and 1 share a text; image 2's own caption loses to caption 0
    img = torch.tensor([[1.0, 0], [0, 1], [1, 0]])
    txt = torch.tensor([[0, 1.0], [1, 0], [0.6, 0.8]])
    groups = torch.tensor([0, 0, 1])
    m = retrieval_metrics(img, txt, ks=(1, 2), groups=groups)
    # image->text: images 0 and 1 find a caption of their text first (caption 1 and 0); image 2 ranks its
    # caption (0.6) below caption 1 (1.0) of the other text: rank 1
    assert m["i2t_recall_at_1"] == pytest.approx(2 / 3) and m["i2t_recall_at_2"] == 1.0
    # text->image: caption 0 finds image 1 (1.0) first: a hit; caption 1 scores images 0 and 2 at 1.0, and
    # image 2 (another text) ties with the best match: rank 1; caption 2 scores its image 2 at 0.6,
    # tied by image 0 and beaten by image 1: rank 2
    assert m["t2i_recall_at_1"] == pytest.approx(1 / 3) and m["t2i_recall_at_2"] == pytest.approx(2 / 3)


def test_caption_keys_compare_tokens_up_to_end_of_text():
    from mtx_data_pipelines.tokenizer import ClipTokenizer
    tok = ClipTokenizer(context_length=16)
    a = torch.from_numpy(tok(["A red  circle", "a red circle", "a blue circle"]))
    b = torch.from_numpy(tok(["a red circle"], pad_multiple=8))  # another batch, another padded length
    assert a.shape[1] != b.shape[1]
    keys = caption_keys(a) + caption_keys(b)
    assert caption_groups(keys).tolist() == [0, 0, 1, 0]  # the tokenizer lowercases and collapses spaces


def test_zero_shot_accuracy_with_known_ranks_and_ties():
    classes = torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]])
    s = 1 / math.sqrt(2)
    images = torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8], [0, 1], [0.8, 0.6], [s, s]])
    labels = torch.tensor([0, 2, 1, 1, 0, 0])
    # scores of the true class and of those at least as high: ranks 0, 1, 1, 0, 1, and 2 for the last
    # (classes 0 and 1 tie at 1/sqrt(2): the tie counts against the true class 0)
    assert zero_shot_accuracy(images, classes, labels, ks=(1, 2, 3, 5)) == \
        pytest.approx({"zeroshot_top1": 2 / 6, "zeroshot_top2": 5 / 6, "zeroshot_top3": 1.0}, abs=1e-7)


def test_class_embedding_is_the_renormalized_mean_of_normalized_prompts():
    vectors = {"a cat": [3.0, 0, 0], "the cat": [0, 4.0, 0], "a dog": [0, 0, 2.0], "the dog": [0, 0, 5.0]}
    names = list(vectors)
    tokenize = lambda texts: torch.tensor([names.index(t) for t in texts])
    encode = lambda ids: torch.tensor([vectors[names[i]] for i in ids])
    got = class_embeddings(encode, tokenize, ["cat", "dog"], ["a {}", "the {}"])
    # normalized first: (1,0,0) and (0,1,0) average to (1,1,0)/2 -> (1,1,0)/sqrt(2); the raw mean
    # (1.5, 2, 0) would point elsewhere
    torch.testing.assert_close(got, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2), 0], [0, 0, 1.0]]))
    assert len(TEMPLATES["simple"]) == 1 and all("{}" in t for t in TEMPLATES["openai"])


def test_class_file_errors(tmp_path):
    (tmp_path / "ok.txt").write_text("cat\ndog\n\n")
    assert read_classnames(str(tmp_path / "ok.txt")) == ["cat", "dog"]
    (tmp_path / "gap.txt").write_text("cat\n\ndog\n")
    with pytest.raises(EvalDataError, match=r"blank line\(s\) \[2\]"):
        read_classnames(str(tmp_path / "gap.txt"))


# -- end to end -------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond")


def _write_labelled_shards(d) -> tuple[str, list[dict]]:
    """Two tar shards: 20 captioned + labelled images, one labelled image without caption, one corrupt
    image, one captioned image whose label has no class. Returns the spec and what a reader should use."""
    from mtx_data_pipelines.demo import COLORS, POSITIONS, caption, render

    rng = np.random.default_rng(0)
    samples, expected = [], []
    for i in range(22):
        shape, color = SHAPES[i % 4], list(COLORS)[i % 6]
        position = list(POSITIONS)[i % 5]
        buf = io.BytesIO()
        render(shape, color, position, "large", 40, rng).save(buf, format="JPEG", quality=90)
        text = caption(shape, color, position, "large", 0)
        s = {"key": f"s{i:03d}", "jpg": buf.getvalue(), "txt": text, "cls": str(i % 4)}
        if i == 20:
            del s["txt"]  # zero-shot only
        if i == 21:
            s["cls"] = "7"  # retrieval only: no class 7 in the class file
        samples.append(s)
        expected.append({"image": buf.getvalue(), "caption": s.get("txt"), "label": int(s["cls"]) if s["cls"] != "7"
                         else None})
    samples.insert(5, {"key": "broken", "jpg": b"\xff\xd8 not a jpeg", "txt": "a broken image", "cls": "0"})
    paths = []
    for shard, part in enumerate((samples[:12], samples[12:])):
        path = os.path.join(d, f"eval-{shard:06d}.tar")
        with tarfile.open(path, "w") as tar:
            for s in part:
                for ext in ("jpg", "txt", "cls"):
                    if ext in s:
                        data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                        info = tarfile.TarInfo(f"{s['key']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return os.path.join(d, "eval-{000000..000001}.tar"), expected


def _direct(open_clip, export_dir: str, expected: list[dict], templates) -> dict[str, float]:
    """The same numbers from open_clip's model, tokenizer and zero-shot classifier, ranks by sorting."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from mtx_data_pipelines.transforms import eval_transform

    model = open_clip.create_model(f"local-dir:{export_dir}").eval()
    ctx = model.context_length
    tokenizer = lambda texts: open_clip.tokenize(texts, context_length=ctx)
    images = torch.stack([torch.from_numpy(eval_transform(Image.open(io.BytesIO(e["image"])).convert("RGB"), 32))
                          for e in expected])
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        cap = [i for i, e in enumerate(expected) if e["caption"]]
        txt = model.encode_text(tokenizer([expected[i]["caption"] for i in cap]), normalize=True)
        out = {}
        sim = (img[cap] @ txt.T).numpy()
        for name, s in (("i2t", sim), ("t2i", sim.T)):
            rank = np.array([list(np.argsort(-row, kind="stable")).index(i) for i, row in enumerate(s)])
            out.update({f"{name}_recall_at_{k}": float(np.mean(rank < k)) for k in (1, 5, 10)})
        lab = [i for i, e in enumerate(expected) if e["label"] is not None]
        classifier = build_zero_shot_classifier(model, tokenizer, list(SHAPES), templates, num_classes_per_batch=None)
        logits = img[lab] @ classifier
        top = logits.topk(4, dim=1).indices.numpy()
        labels = np.array([expected[i]["label"] for i in lab])
        out["zeroshot_top1"] = float(np.mean(top[:, 0] == labels))
        out["n_retrieval"], out["n_zeroshot"] = float(len(cap)), float(len(lab))
    return out


def _metrics(stdout: str) -> dict[str, float]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("metrics: "))
    return json.loads(line[len("metrics: "):])


@pytest.mark.slow
def test_eval_cli_equals_open_clip_on_the_export(open_clip, demo_shards, tmp_path, capsys):
    """Train the micro model a few steps, export it for OpenCLIP, and `mtx-dist eval` the run and the
    export on labelled shards: both print the recall@K and zero-shot accuracy that open_clip's own
    model, tokenizer and zero-shot classifier give on the same images; bad samples are counted; the
    numbers are in MLflow; a blocks-only export is refused with a clear message."""
    from mlflow.tracking import MlflowClient

    train, val, _ = demo_shards
    shards, expected = _write_labelled_shards(str(tmp_path))
    (tmp_path / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    run_dir, export_dir, uri = tmp_path / "run", tmp_path / "oc", f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli(["train", "model.preset=micro", f"run.dir={run_dir}", "run.steps=6", "optim.warmup_steps=1",
                   f"data.train={train}", f"data.val={val}", "data.batch_size=8", "data.workers=0",
                   "run.eval_at_end=false", "tracking.enabled=false"], cwd=str(tmp_path), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(["export", str(run_dir), "--format", "open_clip", "--out", str(export_dir)], cwd=str(tmp_path),
                  timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]

    args = ["--data", shards, "--classes", str(tmp_path / "classes.txt"), "--batch-size", "8", "--json"]
    res = run_cli(["eval", str(export_dir), *args, "--templates", "simple", "--tracking-uri", uri], cwd=str(tmp_path),
                  timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = _metrics(res.stdout)
    direct = _direct(open_clip, str(export_dir), expected, TEMPLATES["simple"])
    assert printed["skipped_corrupt_image"] == 1 and printed["skipped_label_out_of_range"] == 1
    assert (printed["n_retrieval"], printed["n_zeroshot"]) == (21, 21)
    for k, v in direct.items():
        assert printed[k] == pytest.approx(v, abs=1e-9), (k, printed, direct)
    assert "retrieval on 21 image-caption pairs" in res.stdout and "zero-shot on 21 labelled images, 4 classes, " \
        "1 templates (simple): top-1" in res.stdout
    run_id = res.stdout.split("(run ")[1].split(")")[0]
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    (inp,) = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs  # the evaluation set, described
    assert inp.tags[0].value == "evaluation" and json.loads(inp.dataset.profile)["shards"] == 2
    assert logged["eval/distinct_captions"] == 21 and logged["eval/chance_recall_at_1"] == pytest.approx(1 / 21)
    assert logged["eval/zeroshot_top1"] == pytest.approx(printed["zeroshot_top1"])
    assert logged["eval/i2t_recall_at_5"] == pytest.approx(printed["i2t_recall_at_5"])

    # the run directory (consolidated checkpoint, our model) prints the same; with the 'openai' ensemble too
    capsys.readouterr()
    assert main(["eval", str(run_dir), *args, "--templates", "openai", "--no-track"]) == 0  # in this process
    from_run = _metrics(capsys.readouterr().out)
    direct = _direct(open_clip, str(export_dir), expected, TEMPLATES["openai"])
    for k, v in direct.items():
        assert from_run[k] == pytest.approx(v, abs=1e-9), (k, from_run, direct)

    # the trainer's end-of-run export holds both towers: the final checkpoint's weights, bit for bit
    at_end, final = load_any(str(run_dir / "export")), load_any(str(run_dir))
    assert at_end.state_dict.keys() == final.state_dict.keys()
    assert all(torch.equal(at_end.state_dict[k], v) for k, v in final.state_dict.items())
    write_export(final.state_dict, final.spec, final.preset, str(tmp_path / "mt"), {}, ("metatransformer",))
    with pytest.raises(SourceError, match=r"is a Meta-Transformer \(image blocks only\) export: it has no text "
                                          r"tower. Evaluation accepts a run directory, a checkpoint directory, or an "
                                          r"export made with --format open_clip"):
        load_any(str(tmp_path / "mt"))
