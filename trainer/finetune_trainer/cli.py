"""`finetune-train`: run a FineTuneJob file locally or in a pod; `predict`, `evaluate`, `validate` subcommands.

Exit codes (errors.py): 0 ok, 2 invalid job file or input data, 1 runtime failure, 75 preempted.
The last error line also goes to the container termination log, where Kubernetes (and so the
operator's status message) picks it up.

`finetune-train torchrun …` is torchrun with those exit codes kept (launch.py); the workers it
starts run this same CLI, each knowing its rank from torchrun's environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune_api.errors import (
    EXIT_INVALID_JOB,
    EXIT_OK,
    EXIT_RUNTIME_ERROR,
    FinetuneError,
    JobFileError,
)
from finetune_api.spec import parse_job, read_job_document
from finetune_trainer import cpus, fetch, plot_helper, startup
from finetune_trainer.safe_io import job_fields, os_error, os_errors

TERMINATION_LOG = "/dev/termination-log"


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune per a job file (the default command)")
    p.add_argument("-f", "--file", required=True, help="FineTuneJob manifest or bare spec (YAML)")
    p.add_argument("--output", help="override spec.output.path")
    p.add_argument("--epochs", type=int, help="override spec.training.epochs")
    p.add_argument("--batch-size", type=int, help="override spec.training.batchSize")
    p.add_argument("--learning-rate", type=float, help="override spec.training.learningRate")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override spec.training.device")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="override spec.training.precision")
    p.add_argument("--seed", type=int, help="override spec.training.seed")
    p.add_argument("--report", choices=["console", "jsonl", "both"], default="console",
                   help="console progress for people, JSON lines on stdout for machines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub)
    sub.add_parser("torchrun", add_help=False,
                   help="torchrun with its usual arguments, exiting with the trainer's exit codes (multi-worker)")
    v = sub.add_parser("validate", help="check a job file and print the resolved spec")
    v.add_argument("-f", "--file", required=True)
    pr = sub.add_parser("predict", help="classify images with an export")
    pr.add_argument("--model", required=True, help="export folder (holds model.json)")
    pr.add_argument("--top", type=int, default=1)
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    pr.add_argument("images", nargs="+")
    ev = sub.add_parser("evaluate", help="evaluate an export on an ImageFolder and write its report")
    ev.add_argument("--model", required=True, help="export folder (holds model.json)")
    ev.add_argument("--data", required=True, help="ImageFolder: <data>/<class>/… with the model's class names")
    ev.add_argument("--report-dir", help="where evaluation.json and the PNGs go (default: <model>/eval-<folder>)")
    ev.add_argument("--batch-size", type=int, default=64)
    sw = sub.add_parser("sweep", help="run a FineTuneSweep locally: its trials, a live table, the best export")
    sw.add_argument("-f", "--file", required=True, help="FineTuneSweep manifest (YAML)")
    sw.add_argument("--parallel", type=int, help="trials at a time in worker processes (default: 1, in-process)")
    sw.add_argument("--output", help="override template.spec.output.path (trials, feature-cache, best/, sweep.json)")
    fetch.add_fetch_parser(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    pairs = {
        ("output", "path"): args.output, ("training", "epochs"): args.epochs,
        ("training", "batchSize"): args.batch_size, ("training", "learningRate"): args.learning_rate,
        ("training", "device"): args.device, ("training", "precision"): args.precision,
        ("training", "seed"): args.seed,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def load_job_with_overrides(path: str, overrides: dict[tuple[str, ...], Any]):
    """Flags override the file before validation, so their errors read like the file's."""
    doc = read_job_document(path)
    if isinstance(doc, dict) and overrides:
        spec = doc.setdefault("spec", {}) if ("spec" in doc or "kind" in doc) else doc
        for keys, value in overrides.items():
            node = spec
            for k in keys[:-1]:
                node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else node
            node[keys[-1]] = value
    return parse_job(doc)


def _reporter(kind: str):
    """Console and/or JSON lines, plus the HTTP push to the operator when the pod is wired for it."""
    from finetune_trainer.http_report import HttpReporter
    from finetune_trainer.report import ConsoleReporter, JsonLinesReporter, MultiReporter

    local = {"jsonl": [JsonLinesReporter()], "both": [ConsoleReporter(), JsonLinesReporter()]}.get(
        kind, [ConsoleReporter()])
    return MultiReporter(*local, HttpReporter.from_environment())


def cmd_train(args: argparse.Namespace) -> int:
    job = fetch.prepare_job(load_job_with_overrides(args.file, _overrides(args)))  # dataset.uri, weights.uri
    plot_helper.start()  # on a spare core, matplotlib imported while the next lines import torch
    with startup.long_lived_imports():  # torch import only once the job file is known good
        from finetune_trainer.distributed import Dist
        from finetune_trainer.fit import fit
        from finetune_trainer.report import Reporter

        if job.spec.model.library == "timm":
            import timm  # noqa: F401  (the model's library, with the others: startup.long_lived_imports)

    startup.keep_freed_memory()  # this process is the trainer: reuse freed tensor memory instead of faulting it in anew
    dist = Dist.from_environment()  # one process, or a torchrun worker

    stop = {"requested": False}

    def on_sigterm(signum, frame):  # finish the step, keep the last checkpoint, exit "preempted"
        stop["requested"] = True
        logging.getLogger("finetune").warning("SIGTERM: stopping after the current step")

    signal.signal(signal.SIGTERM, on_sigterm)
    # Rank 0 speaks for the group (console, JSON lines, pushes); the others stay quiet except for errors.
    reporter = _reporter(args.report) if dist.main else Reporter()
    try:
        with os_errors(job_fields(job.spec)):  # an OS error names its path and the spec field that holds it
            result = fit(job.spec, reporter, Path(job.spec.output.path), name=job.name,
                         should_stop=lambda: stop["requested"], dist=dist)
    finally:
        reporter.close()
        plot_helper.finish()
    if dist.main:
        test = f", test accuracy {result.test_accuracy:.4f}" if result.test_accuracy is not None else ""
        print(f"val accuracy {result.val_accuracy:.4f} (best epoch {result.best_epoch}){test} -> "
              f"{result.output / result.weights_file}", file=sys.stderr)
    # Kubernetes copies this into the pod status; the operator lifts it into status.output.
    summary = {"weightsFile": result.weights_file, "sha256": result.sha256, "bestEpoch": result.best_epoch,
               "valAccuracy": result.val_accuracy, "valLoss": result.val_loss, "epochs": result.epochs_run}
    if result.test_accuracy is not None:
        summary["testAccuracy"] = result.test_accuracy
    if sources := fetch.read_lineage(result.output):
        summary["sources"] = sources
    _termination_message(json.dumps(summary))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    job = load_job_with_overrides(args.file, {})
    yaml.safe_dump({"name": job.name, "spec": job.spec.to_wire()}, sys.stdout, sort_keys=False)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    with startup.long_lived_imports():
        from finetune_trainer.predict import predict_files

    failed = 0
    with os_errors({"--model": args.model}):
        predictions = predict_files(args.model, args.images, args.top)
    for path, top in predictions:
        if not top:
            failed += 1
            print(f"{path}\terror: unreadable image", file=sys.stderr)
        elif args.json:
            print(json.dumps({"image": path, "predictions": [{"class": c, "probability": p} for c, p in top]}))
        else:
            print(f"{path}\t" + "\t".join(f"{c}\t{p:.4f}" for c, p in top))
    return EXIT_INVALID_JOB if failed else EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    with startup.long_lived_imports():
        from finetune_trainer.predict import evaluate_folder

    with os_errors({"--model": args.model, "--data": args.data, "--report-dir": args.report_dir}):
        summary = evaluate_folder(Path(args.model), Path(args.data), args.report_dir, args.batch_size)
    print(summary["summary"])
    print(f"report: {summary['reportDir']}/{summary['files']['report']}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from finetune_api.sweep import parse_sweep

    sweep = fetch.prepare_sweep(parse_sweep(read_job_document(args.file)), args.output)  # dataset.uri …
    if args.parallel is not None and args.parallel < 1:
        raise JobFileError(f"--parallel must be at least 1 (got {args.parallel})")
    with startup.long_lived_imports():  # torch only once the file is known good
        from finetune_trainer.sweep import LocalSweep

    doc = LocalSweep(sweep, Path(args.output) if args.output else None, args.parallel).run()
    best = doc["best"]
    print(f"best trial {best['trial']}: {doc['objective']['metric']} {best['metric']:.4f} "
          f"({', '.join(f'{k}={v}' for k, v in best['parameters'].items())}) -> {best['export']}", file=sys.stderr)
    return EXIT_OK


def _termination_message(text: str) -> None:
    """Kubernetes mounts /dev/termination-log into containers; outside a pod it does not exist."""
    path = os.environ.get("FINETUNE_TERMINATION_LOG") or TERMINATION_LOG
    if path == TERMINATION_LOG and not os.path.exists(path):
        return
    try:
        with open(path, "w") as f:
            f.write(text[-4000:])
    except OSError:
        pass  # not in a pod


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["torchrun"]:  # torchrun parses its own arguments (and the trainer's after them)
        from finetune_trainer import launch

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return _guarded(lambda: launch.main(argv[1:]))
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cpus.cap_threads()  # before any command imports torch: its thread pool fits the CPU quota
    handlers = {"train": cmd_train, "validate": cmd_validate, "predict": cmd_predict, "evaluate": cmd_evaluate,
                "sweep": cmd_sweep, "fetch": fetch.cmd_fetch}
    if args.command is None:
        build_parser().print_help()
        return EXIT_INVALID_JOB
    return _guarded(lambda: handlers[args.command](args))


def _guarded(command: Callable[[], int]) -> int:
    """Run a command; errors become one line on stderr, the termination message and an exit code."""
    try:
        return command()
    except FinetuneError as err:
        return _failed(err)
    except OSError as err:  # one the command did not attribute to a field: still one line, naming the path
        return _failed(os_error(err, {}))
    except Exception as err:
        traceback.print_exc()
        print(f"error: runtime failure: {type(err).__name__}: {err}", file=sys.stderr)
        _termination_message(f"{type(err).__name__}: {err}")
        return EXIT_RUNTIME_ERROR


def _failed(err: FinetuneError) -> int:
    kind = "invalid job" if isinstance(err, JobFileError) else "failed"
    print(f"error: {kind}: {err}", file=sys.stderr)
    _termination_message(f"{type(err).__name__}: {err}")
    return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
