"""``embedkit info MODEL``: what a model is, before you trust its vectors."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's dimension, max length, pooling, size and content hash")
    p.add_argument(
        "model", nargs="?", default="default", help="default, a local dir, a model.tar.gz, s3://..."
    )
    p.add_argument("--pooling", default=None, help="override the pooling mode")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from embedkit.models import content_hash, load_text_model, resolve_model
    from embedkit.models.clip import is_clip_dir, load_clip_model

    path = resolve_model(args.model)
    model = load_clip_model(path) if is_clip_dir(path) else load_text_model(path, pooling=args.pooling)
    info = {
        "model": args.model,
        "name": model.name,
        "path": str(path),
        "model_type": model.model_type,
        "dimension": model.dimension,
        "max_seq_length": model.max_seq_length,
        "pooling": model.pooling,
        "normalize": model.normalize,
        "parameters": model.num_parameters,
        "prompts": model.prompts,
        "outputs": list(getattr(model, "outputs", ("dense",))),
        "content_hash": content_hash(path),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
