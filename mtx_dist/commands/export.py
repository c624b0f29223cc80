"""``mtx-dist export``: the frozen encoder of a run or checkpoint in the formats users load (Meta-Transformer,
OpenCLIP, transformers, timm); ``mtx-dist import``: a transformers CLIPModel folder into those formats."""

from __future__ import annotations

import argparse

from mtx_dist.export.formats import DTYPE_NAMES, FORMATS


def _formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(FORMATS)} (comma-separated for several)")
    return formats


def _run(args: argparse.Namespace) -> int:
    import os

    from mtx_dist.export.common import DTYPES
    from mtx_dist.export.source import load_checkpoint
    from mtx_dist.export.writers import write_export

    source = load_checkpoint(args.source, args.preset)
    path = write_export(source.state_dict, source.spec, source.preset, args.out, source.info, args.format,
                        DTYPES[args.dtype])
    names = sorted(f for f in os.listdir(args.out) if not f.endswith(".tmp"))
    print(f"exported {source.preset} ({', '.join(args.format)}, {args.dtype}) from {source.info['checkpoint']} "
          f"(step {source.info['step']}) to {os.path.abspath(args.out)}: {', '.join(names)}")
    print(f"manifest: {path}")
    return 0


def _import(args: argparse.Namespace) -> int:
    import os

    from mtx_dist.export.common import DTYPES
    from mtx_dist.export.writers import write_export
    from mtx_dist.interop.hf import HfConversionError, folder_spec, is_hf_folder, read_hf_folder
    from mtx_dist.models.presets import preset_named

    if not is_hf_folder(args.source):
        raise HfConversionError(f"{args.source!r} is not a transformers model folder (no config.json)")
    spec = folder_spec(args.source)
    preset = preset_named(spec)
    if preset is None:
        raise HfConversionError(f"{args.source!r}: its geometry matches no model.preset (ours or an OpenCLIP model "
                                f"name): {spec}")
    state = read_hf_folder(args.source, spec)
    path = write_export(state, spec, preset, args.out, {"imported_from": os.path.abspath(args.source)}, args.format,
                        DTYPES[args.dtype])
    print(f"imported {args.source} as preset {preset} ({', '.join(args.format)}) to {os.path.abspath(args.out)}; "
          f"continue pretraining with model.preset={preset} model.init_from={args.source}")
    print(f"manifest: {path}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="export the frozen encoder of a run or checkpoint",
                       description="Consolidate a checkpoint (any ZeRO stage, any tensor-parallel size) and write "
                                   "the encoder: 'metatransformer' = the image blocks as Meta-Transformer loads them "
                                   "(encoder.safetensors, encoder.pth); 'open_clip' = both towers as an OpenCLIP "
                                   "model (open_clip_model.safetensors + open_clip_config.json); 'hf' = a Hugging Face "
                                   "transformers CLIPModel folder (config.json, model.safetensors, tokenizer and "
                                   "image-processor files; CLIPModel/CLIPProcessor.from_pretrained); 'timm' = the image "
                                   "tower as a timm VisionTransformer; 'mlflow' = the folder as an MLflow pyfunc "
                                   "model (with open_clip). manifest.json "
                                   "records geometry, preprocessing, provenance and file hashes.")
    e.add_argument("source", help="run directory (its latest checkpoint) or a checkpoint directory")
    e.add_argument("--format", type=_formats, required=True, metavar="F",
                   help=f"{' | '.join(FORMATS)}, or several comma-separated")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="tensor dtype of the files (default fp32)")
    e.add_argument("--preset", help="model preset, only for checkpoints saved without their config.toml")
    e.set_defaults(func=_run)

    i = sub.add_parser("import", help="convert a transformers CLIPModel folder into our export formats",
                       description="Read a Hugging Face transformers CLIPModel folder (config.json + "
                                   "model.safetensors, exact GELU) whose geometry is one of our presets and write it "
                                   "as an export (the formats of 'mtx-dist export'). To continue pretraining from it, "
                                   "give the folder to model.init_from.")
    i.add_argument("source", help="transformers CLIPModel folder")
    i.add_argument("--format", type=_formats, default=["metatransformer", "open_clip"], metavar="F",
                   help=f"{' | '.join(FORMATS)}, or several comma-separated (default metatransformer,open_clip)")
    i.add_argument("--out", required=True, help="output directory")
    i.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="tensor dtype of the files (default fp32)")
    i.set_defaults(func=_import)
