"""``embedkit export OUTPUT --format npy|faiss``: a job's vectors and ids as .npy files / a FAISS index."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a job's output as embeddings.npy + ids.npy (and a FAISS index with --format faiss)",
    )
    p.add_argument("output", metavar="OUTPUT", help="the output folder of `embedkit embed` (local or s3://)")
    p.add_argument(
        "--format", dest="fmt", choices=("npy", "faiss"), default="npy", help="npy (default) or faiss"
    )
    p.add_argument("--to", dest="dest", default=None, help="destination folder (default OUTPUT/export)")
    p.add_argument(
        "--faiss-factory",
        default="Flat",
        help="faiss.index_factory string: Flat (exact, default), IVF1024,Flat...",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from embedkit.batch.export import export_output

    info = export_output(args.output, fmt=args.fmt, dest=args.dest, factory=args.faiss_factory)
    print(
        f"exported {info['count']:,} vectors ({info['dimension']} dims, metric {info['metric']}) to "
        f"{info['dest']}: {', '.join(info['files'])}"
    )
    return 0
