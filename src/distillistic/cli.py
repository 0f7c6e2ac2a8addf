"""Command line: ``distillistic train | demo | sweep | tune | report | export | calibrate | list | ...``.

This is the only module that sees ``argparse``. ``train`` flags are generated from the config's
fields (``--some-key`` is the key ``some_key``), so every flag is a config key and vice versa. Any
:class:`~distillistic.errors.UserError` is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from distillistic import config as config_mod
from distillistic.errors import UserError, one_line, shown
from distillistic.imports import installed_version
from distillistic.names import default_text

log = logging.getLogger("distillistic")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --epoch must not silently mean --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit code 2 (argparse prints usage too)
        self.exit(2, f"distillistic: error: {message} (see '{self.prog} --help')\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key, grouped as the fields' metadata (and the methods' specs) say."""
    from distillistic.config.keys_help import groups, help_text

    hints = typing.get_type_hints(config_mod.Config)
    for title, names in groups().items():
        group = parser.add_argument_group(title)
        for name in names:
            param = config_mod.param_of(name)
            default = param.default if param is not None else config_mod.default_of(name)
            is_bool = (param.type is bool) if param is not None else hints[name] in (bool, bool | None)
            text = help_text(name)
            if name == "dataset":  # every registered dataset, from the registry's names (names.json: no torch)
                from distillistic.names import shipped

                text = "dataset: " + ", ".join(shipped()["datasets"])
            shown = "" if "(default" in text else f" (default: {default_text(default)})"
            flag = "--" + name.replace("_", "-")
            if is_bool:
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=text + shown)
            else:
                group.add_argument(flag, dest=name, metavar=name.upper(), default=argparse.SUPPRESS, help=text + shown)
    group = parser.add_argument_group("shortcuts")
    group.add_argument("--no-teacher-store", dest="teacher_store", action="store_const", const="off",
                       default=argparse.SUPPRESS, help="compute the teacher live every step")
    group.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key (repeatable)")


TRAIN_EXAMPLES = """examples:
  # the offline quick start (about a minute on 2 cores): KD from a small teacher trained first, on the shipped digits
  distillistic train --algo kd --dataset mnist-t10k --max-train-samples 2000 --augment none --batch-size 64 \\
      --lr 3e-3 --model mlp --teacher cnn --teacher-epochs 6 --temperature 4 --epochs 5 --out runs/kd
  # a config file, one key changed
  distillistic train configs/x.yaml --set lr=0.01 --out runs/x
  # your own model and data (docs/custom.md)
  distillistic train --model my_models:build_net --dataset my_models:load_data --out runs/mine
  # continue an interrupted run
  distillistic train configs/x.yaml --out runs/x --resume

Every option is a config key (--batch-size is batch_size); a YAML file can hold any of them."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distillistic", description="Knowledge distillation for image classification.")
    parser.add_argument("--version", action="version", version=f"distillistic {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train and evaluate one run", description=TRAIN_EXAMPLES,
                       usage="distillistic train [CONFIG] [--KEY VALUE ...] [--set KEY=VALUE ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (flags and --set override it)")
    _add_config_flags(p)
    from distillistic.experiments import demo  # its help, beside its cells (no torch)

    p = sub.add_parser("demo", help=demo.HELP)
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs (default: runs/demo)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per algorithm (default: 3)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (default: 5)")
    p.add_argument("--algos", nargs="+", default=None,
                   help=demo.ALGOS_HELP)
    p.add_argument("--verbose", action="store_true", help="also print every run's own lines (start, epochs)")
    p = sub.add_parser("export", help="write a run's students as .safetensors files (weights + metadata)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of 'distillistic train'")
    p.add_argument("--out", default=None, help="folder for the files (default: RUN_DIR/export)")
    p.add_argument("--which", choices=("best", "last"), default="best",
                   help="best-on-val weights (default) or the last epoch's")
    p.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    _add_deploy_flags(p)
    p = sub.add_parser("bench-model", help="latency (batch 1) and throughput on CPU of exported students")
    p.add_argument("file", metavar="FILE", help="an .onnx or .safetensors export, an export folder or a run directory")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    p.add_argument("--batch", type=int, default=256, help="batch for the throughput (default: 256)")
    p = sub.add_parser("predict", help="top-k classes of image files from an exported student")
    p.add_argument("file", metavar="FILE", help="an .onnx or .safetensors export or a run directory")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders of them")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes shown per image (default: 5)")
    p = sub.add_parser("calibrate", help="temperature-scale a finished run's models (T fitted on val), "
                       "ECE/NLL/Brier before and after on test")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory of 'distillistic train'")
    p.add_argument("--device", default=None, help="device to evaluate on (default: the run's --device)")
    p.add_argument("--data-root", default=None, help="where the run's data is now (default: the run's --data-root)")
    p.add_argument("--cache-dir", default=None, help="the cache holding the run's teacher and downloaded data "
                                                     "(default: the run's --cache-dir)")
    _add_experiment_commands(sub)
    return parser


def _add_experiment_commands(sub: Any) -> None:
    """``sweep``, ``tune``, ``report``, ``reproduce`` and ``list``."""
    p = sub.add_parser("sweep", help="run every cell of a sweep config (grid/variants), each in its own run dir")
    p.add_argument("config", help="sweep YAML: base config keys, grid: {key: [values]}, optional variants:")
    p.add_argument("--out", required=True, help="sweep directory (cells go to DIR/<name>; re-run to continue)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th cell starting at I (0 <= I < N)")
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every cell (repeatable; not a grid axis)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                   help="also log every cell to Weights & Biases (one group per sweep)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    p.add_argument("--dry-run", action="store_true", help="list the cells and what would happen to each, run nothing")
    p = sub.add_parser("report", help="aggregate run directories: report.md, results.csv and figures")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep or run directories (searched recursively)")
    p.add_argument("--out", default=None, help="report directory (default: DIR/report for one DIR)")
    p.add_argument("--x", default="train_flops",
                   choices=("params", "flops", "latency", "train_flops", "train_seconds"),
                   help="the cost of the Pareto figure and mark (default: train_flops, a teacher's training included)")
    p.add_argument("--reference", default=None, metavar="NAME",
                   help="the cell each other is compared with, paired by seed (default: the baseline, if any)")
    p = sub.add_parser("reproduce", help="re-measure a thesis claim: its sweep (3 seeds), report and table")
    p.add_argument("claim", metavar="CLAIM", help="a thesis claim, e.g. hinton or cross-quality ('distillistic "
                   "reproduce list' lists them all)")
    p.add_argument("--out", default="runs/reproduce", help="folder for the claims (default: runs/reproduce)")
    p.add_argument("--data-root", default=None, help="MNIST t10k folder (default: ../shared/datasets/mnist-t10k, "
                   "else scikit-learn's digits)")
    p.add_argument("--full", action="store_true",
                   help="the thesis-scale setting (Fashion-MNIST, 20 epochs; a GPU's work)")
    p = sub.add_parser("tune", help="tune each method of --algo A,B,... with the same budget (Optuna, on val), then "
                       "re-train each best config on the same seeds", usage="distillistic tune [CONFIG] --algo A,B,... "
                       "--trials N --out DIR [--storage URL] [--objective M] [--seeds S] [--KEY VALUE ...]")
    p.add_argument("config", nargs="?", help="YAML config file (its keys, and the flags, are fixed, not tuned)")
    p.add_argument("--trials", type=int, required=True, help="trials for every method (its tuning budget)")
    p.add_argument("--storage", help="an Optuna database URL that workers share (default: sqlite DIR/tune.db)")
    p.add_argument("--objective", default="top1", help="on val: top1 (maximised), nll or ece (default: top1)")
    p.add_argument("--seeds", type=int, default=3, help="seeds re-training each best config (default: 3; 0: none)")
    p.add_argument("--tune-epochs", type=int, help="epochs of a trial (default: --epochs)")
    _add_config_flags(p)
    p = sub.add_parser("list", help="list registered algorithms, datasets and models")
    p.add_argument("what", nargs="?", choices=("algos", "datasets", "models", "divergences"))
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="models: print each model's parameter count for K classes, by family")
    p.add_argument("--family", default=None, help="models: only this family (torchvision, cifar, small, timm)")


def _train(args: argparse.Namespace) -> int:
    from distillistic.runs.rundir import stop_exit_code
    from distillistic.training.run import train
    from distillistic.training.runtime import stop_every_rank

    stop_exit_code(clear=True)
    try:
        given = _given(args)
        cfg = config_mod.load(args.config, given)
        from distillistic.training.setup import check_given  # the method's checks of the keys given explicitly

        check_given(cfg, {*given, *(config_mod.read_yaml(args.config) if args.config else {})})
    except UserError as e:  # under torchrun: every rank stops with this rank's line, none waits for it
        stop_every_rank(e)
        raise
    if cfg.quiet:
        logging.getLogger("distillistic").setLevel(logging.WARNING)
    result = train(cfg)
    status = result.summary.get("status")
    if status == "completed" and os.environ.get("RANK", "0") == "0":
        print(_summary_line(result.summary, result.out))
    elif status == "interrupted" and os.environ.get("RANK", "0") == "0":
        reason = result.summary.get("reason")
        resume = (f"; resume with: {resume_command(args.argv)}"
                  if any(result.out.glob("**/checkpoints/last.pt")) else "")  # or a generation's (ban)
        if result.summary.get("stage") == "teacher":  # nothing distilled yet: the same command resumes both
            resume = f"; nothing was distilled from it; resume both with: {resume_command(args.argv, same=True)}"
        print(f"distillistic: {reason}{resume}", file=sys.stderr)
    if status == "interrupted":  # after the checkpoint: a script can tell a stopped run from a finished one
        return stop_exit_code()
    return 0


def _given(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The config keys the flags and ``--set`` give, coerced to their types."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "set_items", "argv", *skip)}
    return {k: config_mod.coerce(k, v) for k, v in values.items()} | config_mod.parse_set(args.set_items)


def _tune(args: argparse.Namespace) -> int:
    from distillistic.experiments.tune import TUNE_OPTIONS, tune_command

    text, code = tune_command(args.config, _given(args, TUNE_OPTIONS), {k: getattr(args, k) for k in TUNE_OPTIONS})
    print(text)
    return code


def resume_command(argv: Sequence[str], same: bool = False) -> str:
    """The command line that continues this run: the same arguments, ``--resume`` instead of ``--overwrite``
    (with ``same``, exactly the same arguments: a run stopped before it started, while training its teacher)."""
    prog = Path(sys.argv[0])
    if prog.name == "__main__.py":
        head = [sys.executable, "-m", "distillistic"]
    elif (found := shutil.which("distillistic")) and prog.exists() and Path(found).resolve() == prog.resolve():
        head = ["distillistic"]
    else:
        head = [str(prog)]
    if same:
        return shlex.join([*head, *argv])
    args = [a for a in argv if a not in ("--overwrite", "--no-overwrite", "--resume", "--no-resume")]
    return shlex.join([*head, *args, "--resume"])


def _add_deploy_flags(p: argparse.ArgumentParser) -> None:
    """``export``'s ONNX flags (the optional extra ``deploy``)."""
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="safetensors: weights + metadata (default); onnx: the student with its preprocessing, "
                        "checked against ONNX Runtime on the test split (needs distillistic[deploy])")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also a static int8 model (ONNX Runtime, QDQ), calibrated on training images")
    p.add_argument("--calibration-images", type=int, default=512, metavar="N",
                   help="training images for int8 calibration (default: 512)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the latency figures (default: 1)")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the latency figures")
    p.add_argument("--data-root", default=None, help="with --format onnx: where the run's data is now, for the "
                                                     "parity check and int8 calibration (default: the run's)")


def _export(args: argparse.Namespace) -> int:
    from distillistic.runs.export import export_run

    if args.format == "onnx" or args.quantize:
        return _export_onnx(args)
    if args.data_root:
        raise UserError("export: --data-root is read by --format onnx only (its parity check and int8 calibration); "
                        "drop it: a .safetensors export reads no data")

    for path in export_run(Path(args.run_dir), Path(args.out) if args.out else None, args.which, args.overwrite):
        print(path)
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    if args.format != "onnx":
        raise UserError("export: --quantize int8 quantizes an ONNX export; add --format onnx")
    if args.threads < 1:
        raise UserError(f"export: --threads {args.threads}: pass a whole number >= 1")
    from distillistic.deploy.pipeline import export_onnx_run
    from distillistic.deploy.report import export_table

    result = export_onnx_run(Path(args.run_dir), Path(args.out) if args.out else None, args.which, args.quantize,
                             args.overwrite, args.calibration_images, args.bench, args.threads, args.data_root)
    print(export_table(result["exported"]))
    print(f"written: {shown(result['path'])}")
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from distillistic.deploy.bench_model import bench_model, table

    print(table(bench_model(Path(args.file), args.threads, args.batch)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from distillistic.deploy.predict import lines, predict

    print("\n".join(lines(predict(Path(args.file), args.images, args.top))))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from distillistic.training.calibrate import calibrate_run, table

    result = calibrate_run(Path(args.run_dir), args.device, args.data_root, args.cache_dir)
    print(table(result))
    print(f"written: {shown(Path(args.run_dir) / 'calibration.json')}")
    return 0


def _summary_line(summary: dict[str, Any], out: Any) -> str:
    parts = []
    for name, entry in summary["models"].items():
        test = entry.get("test")
        if test:
            parts.append(f"{name} top1 {test['top1']:.4f} ece {test['ece']:.4f}")
    return f"{shown(out)}: " + "; ".join(parts)


def _list(args: argparse.Namespace) -> int:
    from distillistic.names import print_list  # no torch: 'list' answers at once

    print_list(args.what, args.num_classes, args.family)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from distillistic.experiments.demo import next_steps, run_demo

    print(run_demo(args.out, seeds=args.seeds, epochs=args.epochs, algos=args.algos, verbose=args.verbose))
    print("\n".join(["", *next_steps(args.out)]))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from distillistic.experiments.grid import parse_shard
    from distillistic.experiments.sweep import describe, run_sweep

    shard = parse_shard(args.shard)
    result = run_sweep(args.config, args.out, shard, config_mod.parse_set(args.set_items), wandb=args.wandb,
                       fail_fast=args.fail_fast, dry_run=args.dry_run)
    if args.dry_run:
        for o in result.outcomes:
            print(f"{o.cell.index:4d}  {o.message:8s}  {o.cell.name}")
        return 0
    print(describe(result))
    if result.interrupted:
        return 130
    return 1 if result.failures else 0


def _report(args: argparse.Namespace) -> int:
    from distillistic.experiments.report import write_report

    out = write_report(args.dirs, args.out, args.x, args.reference)
    print(f"report: {shown(out / 'report.md')}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from distillistic.experiments.reproduce import CLAIMS, reproduce

    if args.claim == "list":
        for claim in CLAIMS.values():
            print(f"{claim.name:18s} {claim.question}")
        return 0
    print(reproduce(args.claim, args.out, args.data_root, args.full))
    folder = Path(args.out) / args.claim
    print(f"claim: {shown(folder / 'claim.md')}")
    if (folder / "report" / "report.md").is_file():
        where = Path(shown(folder))
        print(f"report: {where / 'report' / 'report.md'} (figures in {where / 'report' / 'figures'}; runs in "
              f"{where / 'runs'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config_mod.import_plugins_named(argv)  # a plugin method's parameters are flags of 'train'
    except UserError as e:
        print(f"distillistic: error: {one_line(e)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.argv = argv  # for the command that resumes an interrupted run
    commands = {"train": _train, "demo": _demo, "sweep": _sweep, "report": _report, "list": _list,
                "export": _export, "reproduce": _reproduce, "tune": _tune,
                "calibrate": _calibrate, "bench-model": _bench_model, "predict": _predict}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"distillistic: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only folder, permissions, a name too long: one line, exit 2
        from distillistic.fileio import os_error_line

        print(f"distillistic: error: {os_error_line(e, action='cannot access')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillistic: interrupted", file=sys.stderr)
        rundir = sys.modules.get("distillistic.runs.rundir")  # a run was under way: 143 if SIGTERM stopped it
        return rundir.stop_exit_code() if rundir is not None else 130


if __name__ == "__main__":
    sys.exit(main())
