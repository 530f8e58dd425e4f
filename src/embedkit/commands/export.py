"""``embedkit export OUTPUT --format npy|faiss``: a job's vectors and ids as .npy files / a FAISS index
(and BGE-M3's sparse and ColBERT outputs as ``sparse.npz`` / ``colbert.npy`` when the job has them)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a job's output as embeddings.npy + ids.npy (and a FAISS index with --format faiss)",
        description="Export a job's output: embeddings.npy (float32) and ids.npy, index.faiss with "
        "--format faiss; a job with --outputs sparse also gets sparse.npz (CSR, rows x vocabulary, "
        "scipy.sparse.load_npz reads it), with colbert colbert.npy (every row's vectors stacked) and "
        "colbert_offsets.npy (int64, rows + 1). export.json describes them.",
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
    dense = f" ({info['dimension']} dims, metric {info['metric']})" if info["dimension"] else ""
    print(
        f"exported {info['count']:,} rows{dense}, outputs {', '.join(info['outputs'])}, to "
        f"{info['dest']}: {', '.join(info['files'])}"
    )
    return 0
