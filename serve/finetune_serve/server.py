"""`finetune-serve --model DIR`: an export on KServe's ModelServer (REST v1 + v2, gRPC v2, /metrics).

kserve.ModelServer's own flags (--http_port, --grpc_port, --workers, --enable_grpc, ...) are accepted as
they are; the model is named after the export (model.json `name`) unless --model_name says otherwise.
Exit codes: 2 when the export cannot be served (one line on stderr), else the server's.
"""

from __future__ import annotations

import argparse
import sys

from finetune_serve.backends import BACKENDS, ExportError, load_backend

EXIT_BAD_EXPORT = 2  # finetune_api.errors.EXIT_INVALID_JOB: the same "fix the input" code as the trainer's


def build_parser() -> argparse.ArgumentParser:
    from kserve import model_server

    p = argparse.ArgumentParser(prog="finetune-serve", parents=[model_server.parser],
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export folder (holds model.json)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: the ONNX graph in onnxruntime when the export has one and it is installed, else "
                   "the safetensors weights in PyTorch")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per network call (across requests)")
    p.add_argument("--max-batch-wait-ms", type=float, default=2.0,
                   help="how long a request waits for others to share its network call")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of the backend (0: its default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batch_size < 1 or args.max_batch_wait_ms < 0:
        print("finetune-serve: --max-batch-size must be >= 1 and --max-batch-wait-ms >= 0", file=sys.stderr)
        return EXIT_BAD_EXPORT
    from finetune_api.errors import FinetuneError

    try:
        export, backend = load_backend(args.model, args.backend, args.threads)
    except (ExportError, FinetuneError) as err:
        print(f"finetune-serve: {err}", file=sys.stderr)
        return EXIT_BAD_EXPORT
    import kserve

    from finetune_serve.predictor import ExportModel

    name = args.model_name if args.model_name != "model" else export.meta["name"]
    model = ExportModel(name, export, backend, args.max_batch_size, args.max_batch_wait_ms)
    model.load()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                       enable_grpc=args.enable_grpc, enable_docs_url=args.enable_docs_url,
                       enable_latency_logging=args.enable_latency_logging).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
