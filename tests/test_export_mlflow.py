"""The ``mlflow`` export: the export folder is an MLflow pyfunc model whose ``predict`` gives our
embeddings and zero-shot scores; registered in a real MLflow server it loads as ``models:/NAME/1``
and a real ``mlflow models serve`` process answers HTTP with the same numbers."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from mtx_data_pipelines.tokenizer import ClipTokenizer
from mtx_data_pipelines.transforms import decode_rgb, eval_transform
from mtx_launchers.env import free_port
from mtx_dist.config import TrackingConfig
from mtx_dist.evaluate import TEMPLATES, class_embeddings
from mtx_dist.export import MANIFEST_FILE, verify_export, write_export
from mtx_dist.models import ContrastiveModel
from mtx_dist.tracking import Tracker
from tests.helpers import DIST_VARS, REPO
from tests.mlflow_server import MlflowServer, wait_until_answering

CLASSES = ["red circle", "blue square", "green triangle"]
TEXTS = ["a red circle on the left", "a blue square", "a photo of a green triangle at the top"]
# Float32 embeddings of unit norm computed by the same model on the same tensors, in batches of
# other sizes: the difference is summation order only, far below 1e-5 of the norm.
TOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_shards):
    """A seeded micro model, its ``mlflow`` export, and a few real JPEGs of the demo set."""
    torch.manual_seed(3)
    model = ContrastiveModel.from_preset("micro").eval()
    root = tmp_path_factory.mktemp("mlflow-export")
    out = str(root / "export")
    write_export(model.state_dict(), model.spec, "micro", out, {"run_dir": None}, ("metatransformer", "mlflow"))
    _, val, _ = demo_shards
    shard = sorted(f for f in os.listdir(demo_shards[2]) if f.startswith("val") and f.endswith(".tar"))[0]
    jpegs = []
    with tarfile.open(os.path.join(demo_shards[2], shard)) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg") and len(jpegs) < 5:
                path = root / os.path.basename(m.name)
                path.write_bytes(tar.extractfile(m).read())
                jpegs.append(str(path))
    return model, out, jpegs


def reference(model: ContrastiveModel, jpegs: list[str], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our embeddings of the files and texts, computed directly (the evaluation transform, full padding)."""
    size = model.spec.vision.image_size
    with torch.no_grad():
        images = torch.stack([torch.from_numpy(eval_transform(decode_rgb(open(p, "rb").read()), size)) for p in jpegs])
        tokens = torch.from_numpy(ClipTokenizer(context_length=model.spec.text.context_length)(texts))
        return model.encode_image(images), model.encode_text(tokens)


def close(got, want: torch.Tensor) -> bool:
    got = torch.tensor(np.array([np.asarray(g, dtype=np.float32) for g in got]))
    return bool(((got - want).norm(dim=-1) <= TOL * want.norm(dim=-1)).all())


def test_export_is_a_pyfunc_model_giving_our_embeddings_and_zero_shot(exported):
    import mlflow.pyfunc

    model, out, jpegs = exported
    manifest = verify_export(out, require="MLmodel")  # listed and hashed like every other file
    assert manifest["formats"] == ["metatransformer", "open_clip", "mlflow"]  # mlflow brings the weights it loads
    assert "mlflow.pyfunc.load_model" in open(os.path.join(out, "README.md")).read()
    pm = mlflow.pyfunc.load_model(out)
    assert pm.metadata.signature.params.to_dict()[0]["name"] == "classes"

    img_ref, txt_ref = reference(model, jpegs, TEXTS)
    # rows: paths, bytes, texts, in any mix; a row may hold an image and a text
    with open(jpegs[1], "rb") as f:
        raw = f.read()
    df = pd.DataFrame({"image": [jpegs[0], None, None, None, jpegs[2]],
                       "image_bytes": [None, raw, None, None, None],
                       "text": [None, None, TEXTS[0], TEXTS[1], TEXTS[2]]})
    res = pm.predict(df)
    assert list(res.columns) == ["image_embedding", "text_embedding"]
    assert res["image_embedding"][2] is None and res["text_embedding"][0] is None
    assert close(res["image_embedding"][[0, 1, 4]], img_ref[:3])
    assert close(res["text_embedding"][[2, 3, 4]], txt_ref)

    # zero-shot: softmax of the logit scale times the cosine to each class embedding, the top class named
    res = pm.predict(pd.DataFrame({"image": jpegs}), params={"classes": CLASSES, "templates": "simple"})
    tok = ClipTokenizer(context_length=model.spec.text.context_length)
    with torch.no_grad():
        cls = class_embeddings(model.encode_text, lambda t: torch.from_numpy(tok(t)), CLASSES, TEMPLATES["simple"])
        all_ref, _ = reference(model, jpegs, TEXTS[:1])
        probs = (model.logit_scale.exp() * all_ref @ cls.t()).softmax(-1)
    assert close(res["scores"], probs)
    assert list(res["label"]) == [CLASSES[i] for i in probs.argmax(-1).tolist()]


def test_bad_input_is_named(exported):
    import mlflow.pyfunc

    _, out, jpegs = exported
    pm = mlflow.pyfunc.load_model(out)
    with pytest.raises(Exception, match=r"rows \[1\] have no 'image', 'image_bytes' or 'text'"):
        pm.predict(pd.DataFrame({"image": [jpegs[0], None], "text": ["x", None]}))
    with pytest.raises(Exception, match="row 0: cannot read image '/no/such.jpg'"):
        pm.predict(pd.DataFrame({"image": ["/no/such.jpg"]}))
    with pytest.raises(Exception, match="an image could not be decoded"):
        pm.predict(pd.DataFrame({"image_bytes": [b"not an image"]}))
    with pytest.raises(Exception, match="templates='fancy'"):
        pm.predict(pd.DataFrame({"text": ["x"]}), params={"classes": CLASSES, "templates": "fancy"})


def test_an_export_with_mlflow_files_replaced_by_another_format_loses_them(exported, tmp_path):
    """Re-exporting into the folder without ``mlflow`` leaves no stale MLmodel pointing at nothing."""
    model, _, _ = exported
    out = str(tmp_path / "again")
    write_export(model.state_dict(), model.spec, "micro", out, {}, ("mlflow",))
    assert os.path.isfile(os.path.join(out, "MLmodel"))
    write_export(model.state_dict(), model.spec, "micro", out, {}, ("metatransformer",))
    assert not os.path.exists(os.path.join(out, "MLmodel"))
    assert sorted(os.listdir(out)) == ["README.md", "encoder.pth", "encoder.safetensors", MANIFEST_FILE]


@pytest.mark.slow
def test_registered_version_loads_and_is_served_over_http(exported, tmp_path):
    """The trainer's path (log the export folder, register it) into a real server; the version loads
    by ``models:/`` URI and a real ``mlflow models serve`` answers a POST with the same numbers."""
    import mlflow.pyfunc

    model, out, jpegs = exported
    server = MlflowServer(str(tmp_path))
    server.start()
    serve = None
    try:
        t = Tracker(TrackingConfig(uri=server.url, experiment="serve", register_as="served-encoder",
                                   system_metrics=False), active=True)
        t.start("serve", {}, "")
        t.log_artifacts(out, "export")
        t.register_model("export")
        t.finish()
        assert t.undelivered == 0

        img_ref, txt_ref = reference(model, jpegs[:2], TEXTS[:2])
        uri = "models:/served-encoder/1"
        os.environ["MLFLOW_TRACKING_URI"] = server.url  # restored after the test by conftest
        res = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": jpegs[:2], "text": TEXTS[:2]}))
        assert close(res["image_embedding"], img_ref) and close(res["text_embedding"], txt_ref)

        port = free_port()
        env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "MLFLOW_TRACKING_URI": server.url,
               "PYTHONPATH": REPO, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(tmp_path / "serve.log", "wb")
        serve = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                  "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                 cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_until_answering(f"{url}/ping", serve, 180, lambda: (tmp_path / "serve.log").read_text()[-3000:])
        # image bytes travel base64-encoded (the signature declares the column binary)
        raw = [base64.b64encode(open(p, "rb").read()).decode() for p in jpegs[:2]]
        body = {"dataframe_split": {"columns": ["image_bytes", "text"], "data": [[raw[0], TEXTS[0]], [raw[1], TEXTS[1]]]},
                "params": {"classes": CLASSES}}
        answer = _post(f"{url}/invocations", body)
        rows = answer["predictions"]
        assert close([r["image_embedding"] for r in rows], img_ref)
        assert close([r["text_embedding"] for r in rows], txt_ref)
        assert all(r["label"] in CLASSES and abs(sum(r["scores"]) - 1) < 1e-5 for r in rows)
        # a bad request gets an HTTP error naming the problem, and the server keeps answering
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(f"{url}/invocations", {"dataframe_split": {"columns": ["text"], "data": [[None]]}})
        assert e.value.code in (400, 422) and "have no 'image'" in e.value.read().decode()
        assert _post(f"{url}/invocations", {"dataframe_records": [{"text": TEXTS[0]}]})["predictions"]
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(timeout=30)
        server.stop()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)

