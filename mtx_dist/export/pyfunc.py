"""The ``mlflow`` export format: the export folder is also an MLflow pyfunc model.

``MLmodel`` names this module as the pyfunc ``loader_module`` with no ``data`` key, so MLflow calls
:func:`_load_pyfunc` with the export folder itself: the weights are the folder's own
``open_clip_model.safetensors`` (verified against the manifest first), never a second copy. A
registered model version that points at an end-of-training export is therefore servable:
``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` and ``mlflow models serve -m models:/NAME/VERSION
--env-manager local`` (the serving Python needs mtx-dist installed, as ``requirements.txt`` says).

``predict`` takes a DataFrame with any of the columns ``image`` (a file path), ``image_bytes``
(encoded image bytes; base64 in a served JSON request) and ``text``, one row per item, and returns
L2-normalised ``image_embedding`` / ``text_embedding`` columns with our preprocessing and tokenizer.
With the parameter ``classes`` (class names) it also returns each image's zero-shot ``label`` and its
``scores`` (softmax over the classes at the model's logit scale), prompts from ``templates``.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid

import torch

from mtx_data_pipelines.files import sha256_file
from mtx_dist.export.common import MLFLOW_FILES, OPENCLIP_FILE, ExportError

IMAGE, IMAGE_BYTES, TEXT = "image", "image_bytes", "text"
BATCH = 64  # images or texts per forward pass
FIXED_TIME = "1980-01-01 00:00:00.000000"  # the date torch.save and zip use for reproducible archives


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE, required=False), ColSpec("binary", IMAGE_BYTES, required=False),
                     ColSpec("string", TEXT, required=False)])
    outputs = Schema([ColSpec(Array("float"), "image_embedding", required=False),
                      ColSpec(Array("float"), "text_embedding", required=False),
                      ColSpec("string", "label", required=False), ColSpec(Array("float"), "scores", required=False)])
    params = ParamSchema([ParamSpec("classes", "string", [], shape=(-1,)), ParamSpec("templates", "string", "openai")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def write_mlflow_model(out_dir: str) -> dict[str, None]:
    """Make ``out_dir`` (an export that holds the open_clip format) an MLflow pyfunc model; returns
    the files written (for the manifest)."""
    import pandas as pd

    import mlflow.pyfunc
    from mlflow.models import Model

    from mtx_dist import package_version

    # save_model refuses an existing folder: write into an empty one, move its files over
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mlflow-") as tmp:
        path = os.path.join(tmp, "model")
        mlflow.pyfunc.save_model(
            path, loader_module=__name__, signature=_signature(),
            input_example=pd.DataFrame({TEXT: ["a photo of a dog"]}),
            # stated, not inferred: inference would load the model in a subprocess
            pip_requirements=[f"mtx-dist=={package_version()}", f"torch>={torch.__version__.split('+')[0]}"])
        # Reproducible like the rest of the export: no clock time, an id derived from the weights
        meta = Model.load(os.path.join(path, "MLmodel"))
        meta.utc_time_created = FIXED_TIME
        meta.model_uuid = uuid.uuid5(uuid.NAMESPACE_OID, sha256_file(os.path.join(out_dir, OPENCLIP_FILE))).hex
        meta.save(os.path.join(path, "MLmodel"))
        written = sorted(os.listdir(path))
        unexpected = [f for f in written if f not in MLFLOW_FILES]
        if unexpected:  # a new MLflow writing something we would not clean up or list
            raise ExportError(f"mlflow.pyfunc.save_model wrote unexpected files {unexpected}")
        for name in written:
            os.replace(os.path.join(path, name), os.path.join(out_dir, name))
    return {name: None for name in written}


class EncoderModel:
    """What ``mlflow.pyfunc.load_model`` wraps: our model, preprocessing and tokenizer."""

    def __init__(self, path: str, device: str | None = None) -> None:
        from mtx_data_pipelines.tokenizer import ClipTokenizer
        from mtx_dist.export.source import load_openclip_export

        source = load_openclip_export(path)
        from mtx_dist.devices import resolve_device

        self.device = resolve_device(device)
        self.model = source.model().to(self.device)
        self.spec = source.spec
        self.tokenizer = ClipTokenizer(context_length=self.spec.text.context_length)

    # -- the pieces, also for direct use --------------------------------------------------------

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        from mtx_data_pipelines.tokenizer import TEXT_PAD_MULTIPLE
        return torch.from_numpy(self.tokenizer(texts, pad_multiple=TEXT_PAD_MULTIPLE))  # trimmed: exact

    @torch.no_grad()
    def encode_images(self, images: list[bytes]) -> torch.Tensor:
        from mtx_data_pipelines.transforms import decode_rgb, eval_transform

        size = self.spec.vision.image_size
        out = []
        for i in range(0, len(images), BATCH):
            batch = torch.stack([torch.from_numpy(eval_transform(decode_rgb(b), size)) for b in images[i:i + BATCH]])
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.spec.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = [self._encode_tokens(self.tokenize(texts[i:i + BATCH])) for i in range(0, len(texts), BATCH)]
        return torch.cat(out) if out else torch.empty(0, self.spec.embed_dim)

    # -- pyfunc --------------------------------------------------------------------------------

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        from mtx_dist.evaluate import TEMPLATES, class_embeddings

        df = pd.DataFrame(model_input)
        params = params or {}
        classes = [str(c) for c in (params.get("classes") or [])]
        templates = params.get("templates") or "openai"
        if templates not in TEMPLATES:
            raise ValueError(f"templates={templates!r}: one of {', '.join(TEMPLATES)}")
        rows = range(len(df))
        col = {c: (df[c].tolist() if c in df.columns else [None] * len(df)) for c in (IMAGE, IMAGE_BYTES, TEXT)}
        images: dict[int, bytes] = {}
        for i in rows:
            path, data = _present(col[IMAGE][i]), _present(col[IMAGE_BYTES][i])
            if path is not None and data is not None:
                raise ValueError(f"row {i}: give either '{IMAGE}' (a path) or '{IMAGE_BYTES}', not both")
            if path is not None:
                try:
                    with open(path, "rb") as f:
                        images[i] = f.read()
                except OSError as e:
                    raise ValueError(f"row {i}: cannot read image {path!r}: {e.strerror or e}") from None
            elif data is not None:
                images[i] = bytes(data)
        texts = {i: str(t) for i in rows if (t := _present(col[TEXT][i])) is not None}
        empty = [i for i in rows if i not in images and i not in texts]
        if empty:
            raise ValueError(f"rows {empty[:10]} have no '{IMAGE}', '{IMAGE_BYTES}' or '{TEXT}'")
        from mtx_data_pipelines.transforms import DecodeError
        try:
            img = dict(zip(images, self.encode_images(list(images.values()))))
        except DecodeError as e:
            raise ValueError(f"an image could not be decoded ({e})") from None
        txt = dict(zip(texts, self.encode_texts(list(texts.values()))))
        out = pd.DataFrame({"image_embedding": [img[i].tolist() if i in img else None for i in rows],
                            "text_embedding": [txt[i].tolist() if i in txt else None for i in rows]})
        if classes:
            cls = class_embeddings(self._encode_tokens, self.tokenize, classes, TEMPLATES[templates])
            scale = self.model.logit_scale.exp().float().cpu()
            probs = {i: (scale * f @ cls.t()).softmax(-1) for i, f in img.items()}
            out["label"] = [classes[int(probs[i].argmax())] if i in probs else None for i in rows]
            out["scores"] = [probs[i].tolist() if i in probs else None for i in rows]
        return out

    @torch.no_grad()
    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device)).float().cpu()


def _present(value):
    """None for a missing cell (None or NaN, as pandas fills absent values in a column)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _load_pyfunc(path: str) -> EncoderModel:
    """MLflow's entry point (``loader_module``): ``path`` is the export folder."""
    return EncoderModel(path)

