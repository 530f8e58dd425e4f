"""``embedkit graph bake``: write a model's ONNX graph next to its weights (what the image and
``sagemaker package-model`` ship), so a fresh container starts without exporting one.

    embedkit graph bake                               # the default model, in its own folder
    embedkit graph bake --model ./my-model --into ./my-model
"""

from __future__ import annotations

import argparse
import json

from embedkit.settings import EngineSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graph", help="ONNX graphs of a model: bake one next to the weights")
    graph = p.add_subparsers(dest="graph_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    bake = graph.add_parser(
        "bake",
        help="export (or copy from the cache) the fp32 ONNX graph into MODEL_DIR/.embedkit/graphs/",
        description="Load the model as `embedkit serve` does (fp32, CPU) and write its ONNX graph "
        "into <dir>/.embedkit/graphs/<digest>/, where the engine finds it when the model's content "
        "hash, precision, outputs and ONNX Runtime version match. Exit 1 when the model gets no graph.",
    )
    # --model and --pooling as the server takes them (flag > EMBEDKIT_MODEL / HF_MODEL_ID > default)
    EngineSettings.add_arguments(bake, skip=tuple(set(EngineSettings.field_names()) - {"model", "pooling"}))
    bake.add_argument(
        "--into", default=None, help="folder that receives .embedkit/graphs/ (default: the model's folder)"
    )
    bake.set_defaults(func=_bake)


def _bake(args: argparse.Namespace) -> int:
    from embedkit.engine.bake import bake_graph

    engine = EngineSettings.from_args(args)
    info = bake_graph(engine.model, args.into, pooling=engine.pooling)
    print(json.dumps(info, indent=2))
    return 0 if info["baked"] else 1
