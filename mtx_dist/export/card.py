"""The model card (``README.md``) of an export folder: what the model is, what it was trained on, how
well it did on held-out data and how to load each format in the folder. Made from the manifest's
content (before the file hashes), so it is as reproducible as the rest of the export."""

from __future__ import annotations

LOADERS = {
    "metatransformer": ("Meta-Transformer (timm blocks)",
                        "import torch, timm\nfrom torch import nn\n"
                        "blocks = nn.Sequential(*[timm.models.vision_transformer.Block({width}, {heads}, mlp_ratio={mlp_ratio},"
                        " qkv_bias=True,\n                        norm_layer=nn.LayerNorm, act_layer=nn.GELU)"
                        " for _ in range({depth})])\n"
                        "blocks.load_state_dict(torch.load('DIR/encoder.pth', weights_only=True), strict=True)"),
    "open_clip": ("OpenCLIP", "import open_clip\nmodel = open_clip.create_model('local-dir:DIR')"),
    "hf": ("Hugging Face transformers",
           "from transformers import CLIPModel, CLIPProcessor\n"
           "model, processor = CLIPModel.from_pretrained('DIR'), CLIPProcessor.from_pretrained('DIR')"),
    "mlflow": ("MLflow pyfunc",
               "import mlflow, pandas as pd\nmodel = mlflow.pyfunc.load_model('DIR')  # or 'models:/NAME/VERSION'\n"
               "out = model.predict(pd.DataFrame({{'image': ['cat.jpg', None], 'text': [None, 'a photo of a cat']}}),\n"
               "                    params={{'classes': ['cat', 'dog']}})  # image_embedding, text_embedding, label, scores"),
    "timm": ("timm", "import timm\nmodel = timm.create_model('local-dir:DIR', pretrained=True)  # num_classes=K: a new head"),
}


def model_card(doc: dict) -> str:
    """Markdown for the manifest ``doc`` (its ``files`` may still be empty)."""
    enc, text, src = doc["encoder"], doc["text"], doc.get("source", {})
    lines = [f"# mtx-dist encoder: `{doc['preset']}`", "",
             "A CLIP-style image-text model pretrained contrastively with mtx-dist; its image encoder is the "
             "frozen encoder that Meta-Transformer's modality tokenizers and heads are trained on.", "",
             "## Geometry", "",
             "| tower | width | depth | heads | MLP ratio | input |", "|---|---|---|---|---|---|",
             f"| image | {enc['width']} | {enc['depth']} | {enc['heads']} | {enc['mlp_ratio']} | "
             f"{enc['image_size']} px, patch {enc['patch_size']} |",
             f"| text | {text['width']} | {text['depth']} | {text['heads']} | {text['mlp_ratio']} | "
             f"{text['context_length']} CLIP BPE tokens |", "",
             f"Embedding dimension {enc['embed_dim']}; pre-LN blocks, GELU, LayerNorm eps 1e-5; class-token "
             f"image pooling, end-of-text text pooling (causal). Tensors in {doc['dtype']}.", "",
             "## Training", ""]
    training = [("run", src.get("run_dir")), ("checkpoint", src.get("checkpoint")), ("step", src.get("step")),
                ("samples seen", src.get("samples")), ("training data", src.get("data")),
                ("ranks", src.get("world_size")), ("ZeRO stage", src.get("zero_stage")),
                ("tensor parallel", src.get("tensor_parallel")), ("MLflow run", src.get("mlflow_run_id"))]
    lines += [f"- {name}: {value}" for name, value in training if value not in (None, "")]
    lines += ["", "## Held-out evaluation", ""]
    held_out = src.get("held_out") or {}
    if held_out:
        lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(held_out.items())]
    else:
        lines.append("Not recorded with this checkpoint: `mtx-dist eval DIR --data SHARDS` measures it.")
    pre = doc["preprocessing"]
    lines += ["", "## Preprocessing", "",
              f"Shortest side to {pre['image_size']} px (bicubic), center crop, RGB, mean {pre['mean']}, std "
              f"{pre['std']}; text: CLIP BPE, lower-cased, context {text['context_length']}.", "",
              "## Loading (DIR = this folder)", ""]
    for fmt in doc["formats"]:
        title, code = LOADERS[fmt]
        lines += [f"### {title}", "", "```python", code.format(**enc), "```", ""]
    lines.append("`manifest.json` lists every file with its sha256; `mtx_dist.export.verify_export(DIR)` checks a copy.")
    return "\n".join(lines) + "\n"
