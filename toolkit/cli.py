"""The `toolkit` command. User errors (ToolkitError) print one message and exit 2 without a
traceback; anything else is a bug and keeps its traceback. torch is imported only by the
commands that need it, after the config has been validated."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from toolkit.errors import ToolkitError, launched_world_size, report
from toolkit.shard import cmd_shard, shard_parser

EXIT_USER_ERROR = 2
EXPORT_FORMATS = ("torchscript", "onnx", "aoti")  # toolkit/export FORMATS (tests hold them equal), without torch


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", "-c", required=required,
                        help="YAML file, or a name in configs/ (cifar.yaml finds configs/cifar.yaml)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, dotted, value parsed as YAML (repeatable): --set optim.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit", description="Train image classifiers from one YAML file; serve them with TorchServe.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run; for several processes use accelerate launch toolkit/train.py")
    _config_args(train, required=False)
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                       help="continue a run from its checkpoints/last and its own config.yaml: the run RUN_DIR, or the "
                            "one --config and --set name; --set may change what a resume can (train.epochs, ...)")

    config = sub.add_parser("config", help="show the resolved config, its JSON Schema or its key reference")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _config_args(config_sub.add_parser("show", help="print the resolved config as YAML"), required=False)
    config_sub.add_parser("schema", help="print the JSON Schema of config files")
    docs = config_sub.add_parser("docs", help="print a Markdown table of every key")
    docs.add_argument("--write", type=Path, metavar="FILE", help="replace the marked block in FILE (README.md) instead")

    export = sub.add_parser("export", help="write RUN_DIR/export/: the model in a serving format, parity-checked, and the handler's files")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", "-f", choices=EXPORT_FORMATS,
                        help="torchscript (model.pt), onnx (model.onnx) or aoti (model.pt2); default: the run config's export.format")
    export.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                        help="fp32, bf16 (torchscript, aoti) or int8 (onnx), a reduced one measured against fp32 on the "
                             "validation set; default: the run config's serve.precision")

    archive = sub.add_parser("archive", help="pack RUN_DIR/export (exported first in export.format if missing or stale) into RUN_DIR/model-store/NAME.mar")
    archive.add_argument("run_dir", type=Path)
    archive.add_argument("--name", help="model name in the URL (default: the run name)")
    archive.add_argument("--version", default="1.0")

    evaluate = sub.add_parser("evaluate", help="evaluate checkpoints/best: report, confusion matrix, pictures")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--data-root", type=Path, help="an ImageFolder (class folders) to evaluate on instead of the run's validation set")

    average = sub.add_parser("average", help="average RUN_DIR/checkpoints/top/ (train.save_top_k) into checkpoints/average, evaluate it beside checkpoints/best")
    average.add_argument("run_dir", type=Path)

    samples = sub.add_parser("samples", help="write validation images of a run as PNG files (to try predict and the server)")
    samples.add_argument("run_dir", type=Path)
    samples.add_argument("--out", type=Path, required=True)
    samples.add_argument("-n", "--count", type=int, default=8)

    shard_parser(sub)
    _predict_parser(sub)
    _serve_parser(sub)
    _sweep_parser(sub)
    _compare_parser(sub)
    return parser


def _predict_parser(sub) -> None:
    predict = sub.add_parser("predict", help="top-k classes of image files, from a run or from a server")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run directory (local inference from checkpoints/best)")
    source.add_argument("--export", type=Path, metavar="DIR", help="an export directory (RUN/export, any format): local inference from the exported file")
    source.add_argument("--url", help="prediction URL, e.g. http://127.0.0.1:8080/predictions/digits")
    predict.add_argument("--token", help="inference token (default: read from the local server on the URL's port)")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print the answers as JSON, one object per image, instead of a table")
    predict.add_argument("images", nargs="+", type=Path)


def _serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="start, stop and inspect a local TorchServe")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True)
    start = serve_sub.add_parser("start", help="start TorchServe on a model store and wait until the models are READY")
    start.add_argument("--model-store", type=Path, required=True)
    start.add_argument("--port", type=int, default=8080, help="inference port; management +1, metrics +2, gRPC +3/+4")
    start.add_argument("--timeout", type=float, default=120)
    start.add_argument("--state-root", type=Path, help="parent of per-port state directories (default ~/.cache/toolkit/serve)")
    for name in ("stop", "status", "token"):
        cmd = serve_sub.add_parser(name)
        cmd.add_argument("--port", type=int, default=8080)
        cmd.add_argument("--state-root", type=Path)


def _sweep_parser(sub) -> None:
    sweep = sub.add_parser("sweep", help="train every combination of config values (--grid), or random draws (--random N): "
                                         "one run each under one sweep directory; here, or as a Slurm job array")
    _config_args(sweep, required=False)
    sweep.add_argument("--grid", "-g", action="append", default=[], metavar="KEY=V1,V2",
                       help="a key and its values (repeatable; the runs are every combination): --grid optim.lr=1e-3,3e-4; "
                            "with --random also KEY=log_uniform(LOW,HIGH), uniform(LOW,HIGH), int_uniform(LOW,HIGH)")
    sweep.add_argument("--random", type=int, metavar="N", help="N random draws from the --grid values and ranges instead of the grid")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the --random draws")
    sweep.add_argument("--out", help="the sweep directory (default: train.output_dir/<config name>-sweep)")
    sweep.add_argument("--launch", metavar="COMMAND", help='launcher of each run: "accelerate launch --config_file ..." '
                                                          '(gets toolkit/train.py) or launch/cpu.sh (gets train\'s arguments)')
    sweep.add_argument("--dry-run", action="store_true", help="validate and list the runs; start nothing")
    sweep.add_argument("--status", metavar="DIR", help="show which runs of the sweep in DIR are done, running, pending or failed")
    sweep.add_argument("--point", nargs=2, metavar=("DIR", "INDEX"), help=argparse.SUPPRESS)  # a job array's task
    sweep.add_argument("--slurm", nargs=argparse.REMAINDER, metavar="SBATCH_OPTION",
                       help="submit one Slurm job array (one task per run) instead; everything after --slurm goes to sbatch")


def _compare_parser(sub) -> None:
    compare = sub.add_parser("compare", help="compare runs: a table of what differs and how they did, and compare.png of their curves")
    compare.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP", help="run directories and sweep directories")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON instead (no table, no picture)")
    compare.add_argument("--out", type=Path, help="a directory to write compare.png in, or a .png file (default: the sweep directory if one "
                                                  "is given, else the current directory)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except ToolkitError as exc:
        if not getattr(exc, "quiet", False):
            report(exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted at once: checkpoints/last holds the last save; continue with --resume", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from toolkit.config_io import load_config
    from toolkit.resume import load_resume_config, wants_resume

    notes: list[str] = []
    try:  # before torch is imported: config errors are instant
        if args.config is None and not isinstance(args.resume, str):
            raise ToolkitError("toolkit train needs --config FILE, or --resume RUN_DIR to continue a run")
        if wants_resume(args.config, args.overrides, args.resume):
            cfg, notes = load_resume_config(args.config, args.overrides,
                                            args.resume if isinstance(args.resume, str) else None)
        else:
            cfg = load_config(args.config, args.overrides)
    except ToolkitError as exc:
        if (launched_world_size() or 1) > 1:  # every process of a launch reads the same bad config: one reports
            from toolkit.runtime import report_from_main_process

            report_from_main_process(exc)
        raise
    from toolkit.engine import train

    from toolkit.preempt import EXIT_RESUME, RESUMABLE

    from toolkit.batch_size import out_of_memory

    try:
        summary = train(cfg, notes=notes)
    except RuntimeError as exc:  # the allocator's out of memory: a message naming the batch size, no traceback
        if (oom := out_of_memory(cfg, exc)) is None:
            raise
        raise oom from None
    if summary.get("status") in RESUMABLE:  # saved mid-epoch; preempt.py said where and how to resume
        return EXIT_RESUME
    if summary.get("status") != "complete" and summary.get("epochs_completed", 0) < cfg.train.epochs:
        print(f"stopped after epoch {summary['epochs_completed']} of {cfg.train.epochs}; continue with --resume")
    return 0


def cmd_config(args) -> int:
    from toolkit import config_io as config

    if args.config_command == "schema":
        print(json.dumps(config.schema(), indent=2))
    elif args.config_command == "docs" and args.write:
        print(f"{args.write}: {'updated' if config.update_docs(args.write) else 'already current'}")
    elif args.config_command == "docs":
        print(config.docs_markdown())
    else:
        print(config.dump_yaml(config.load_config(args.config, args.overrides).resolved()), end="")
    return 0


def cmd_export(args) -> int:
    from toolkit.export import describe_export, export_model

    print(describe_export(export_model(args.run_dir, format=args.format, precision=args.precision)))
    return 0


def cmd_archive(args) -> int:
    from toolkit.archive import build_archive, check_archive
    from toolkit.export import format_of_file

    mar = build_archive(args.run_dir, name=args.name, version=args.version)
    serialized = check_archive(mar)["model"]["serializedFile"]
    print(f"archived {mar} ({format_of_file(serialized)}: {serialized}; {mar.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_evaluate(args) -> int:
    from toolkit.evaluate import evaluate_run

    evaluate_run(args.run_dir, data_root=args.data_root)
    return 0


def cmd_average(args) -> int:
    from toolkit.average import average_run

    average_run(args.run_dir)
    return 0


def cmd_samples(args) -> int:
    from toolkit.samples import write_samples

    for path in write_samples(args.run_dir, args.out, args.count):
        print(path)
    return 0


def cmd_predict(args) -> int:
    from toolkit.predict import predict_command

    predict_command(args)
    return 0


def cmd_serve(args) -> int:
    from toolkit import server

    if args.serve_command == "start":
        info = server.start_server(args.model_store, port=args.port, state_root=args.state_root,
                                   timeout=args.timeout)
        print(f"TorchServe ready: {', '.join(info.models)} on {info.inference_url} "
              f"(management {info.management_url}, metrics {info.metrics_url}; state {info.state_dir})")
        for model in info.models:
            print(f"  {info.predictions_url(model)}")
        print("try:\n  " + server.curl_example(info, "IMAGE.png"))
        print(f"stop with: toolkit serve stop --port {args.port}")
    elif args.serve_command == "stop":
        stopped = server.stop_server(args.port, args.state_root)
        print(f"stopped TorchServe on port {args.port}" if stopped else f"no TorchServe running on port {args.port}")
    elif args.serve_command == "status":
        status = server.server_status(args.port, args.state_root)
        print(json.dumps(status, indent=2, default=str))
        return 0 if status.get("running") else 1
    else:
        print(server.read_token(args.port, "inference", args.state_root))
    return 0


def cmd_sweep(args) -> int:
    from toolkit import sweep_launch
    from toolkit.sweep import Sweep, plan, status_table

    if args.status or args.point:
        if args.status:
            from rich.console import Console

            table, line = status_table(Sweep(args.status))
            Console().print(table)
            print(line)
            return 0
        return sweep_launch.run_task(args.point[0], int(args.point[1]), args.launch)
    if args.config is None:
        raise ToolkitError("toolkit sweep needs --config FILE and --grid KEY=V1,V2 (or --status DIR)")
    planned = plan(args.config, args.overrides, args.grid, args.random, args.seed, args.out)
    if args.dry_run:
        for run in planned["runs"]:
            print(f"{planned['dir']}/{run['name']}")
        print(f"{len(planned['runs'])} runs, all valid; nothing started (--dry-run)")
        return 0
    sweep = Sweep(planned["dir"])
    sweep.create(planned)
    if args.slurm is not None:
        sweep_launch.submit_array(sweep, args.slurm, args.launch)
        return 0
    return sweep_launch.run_local(sweep, args.launch)


def cmd_compare(args) -> int:
    from toolkit.compare import compare_command

    compare_command(args.paths, as_json=args.json, out=args.out)
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "export": cmd_export, "archive": cmd_archive,
            "evaluate": cmd_evaluate, "average": cmd_average, "samples": cmd_samples, "shard": cmd_shard, "predict": cmd_predict,
            "serve": cmd_serve, "sweep": cmd_sweep, "compare": cmd_compare}


if __name__ == "__main__":
    sys.exit(main())
