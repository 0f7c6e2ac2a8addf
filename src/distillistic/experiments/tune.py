"""``distillistic tune``: the same tuning budget for every method (Optuna), then each best config on fresh seeds.

For each method of ``--algo``: ``--trials N`` trials over its search space (:mod:`.tune_space`), drawn by a seeded
TPE sampler and judged on the **validation split only** (top-1 by default; NLL or ECE), each trial a run of
``--tune-epochs`` epochs that a median pruner may stop after any epoch but the last (the run tells its per-epoch
validation rows through :func:`~distillistic.training.listeners.on_epoch`). Every method's study (named by the
method) lives in ``DIR/tune.db`` (SQLite), or in the database ``--storage URL`` names, which several workers
(processes, machines, a SLURM array) may share: each asks for a trial while fewer than N are finished or
running, so together they run N, none twice. A worker killed mid-trial loses that trial only (a worker on the
same machine sees that its process is gone, another one after Optuna's heartbeat grace period) and a new trial
takes its place in the budget; finished trials stay.

Then every method's best configuration is re-trained as a sweep in ``DIR`` (cells ``<method>,seed=<s>``, the same
seeds for every method: ``seed + 1 ... seed + S``, none of them the tuning seed) and tested, so that
``distillistic report DIR`` gives the comparison. Trials run in ``DIR/.trials`` (hidden from the report); their
checkpoints are removed when they end, their summary and metric rows stay. ``DIR/tune.json`` records every
method's space, trials and best. A key the user sets is fixed, not tuned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distillistic import config as config_mod
from distillistic.errors import TeacherStopped, UserError
from distillistic.experiments import tune_space
from distillistic.experiments.grid import RESERVED, expand, read_by
from distillistic.experiments.tune_study import DIRECTIONS, TrialStopped, Tuner, TuneResult
from distillistic.fileio import atomic_write_json

log = logging.getLogger("distillistic")

__all__ = ["TUNE_OPTIONS", "TuneResult", "check_options", "describe", "tune", "tune_command"]

TUNE_OPTIONS = ("trials", "storage", "objective", "seeds", "tune_epochs")
PER_METHOD = "per_method"  # the config file's key: method -> the keys fixed for that method only


def check_per_method(per_method: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The keys fixed for one method only (``per_method: {dml: {students: 2}}`` in a tune's config file), checked:
    known methods, mappings of keys the method reads, none a tune's own or per-run key. A method not in
    ``--algo`` is allowed (one config file serves several invocations) and ignored."""
    if not isinstance(per_method, Mapping):
        raise UserError(f"tune: {PER_METHOD} must map a method to its fixed keys (e.g. {{dml: {{students: 2}}}}), "
                        f"not {type(per_method).__name__}")
    checked: dict[str, dict[str, Any]] = {}
    for method, keys in per_method.items():
        tune_space.method_spec(str(method))
        if not isinstance(keys, Mapping):
            raise UserError(f"tune: {PER_METHOD}: '{method}' must map keys to values (e.g. {{students: 2}}), "
                            f"not {type(keys).__name__}")
        keys = {str(k).replace("-", "_"): v for k, v in keys.items()}
        for key in keys:
            if key in ("algo", "seed", *RESERVED):
                raise UserError(f"tune: {PER_METHOD}: '{method}' sets '{key}', which a tune decides itself")
            if key not in read_by(str(method), {key: None}):
                raise UserError(f"tune: {PER_METHOD}: '{method}' does not read '{key}' (it would be ignored); "
                                "remove it")
        config_mod.from_mapping({**base, **keys})  # unknown keys and bad values: the config's own one line
        checked[str(method)] = keys
    return checked


def check_options(algos: Sequence[str], trials: int, objective: str, seeds: int, tune_epochs: int | None,
                  base: Mapping[str, Any]) -> None:
    """Refuse bad options before anything is opened or written."""
    if not algos:
        raise UserError("tune: --algo names no method; pass e.g. --algo kd,dkd,dml")
    twice = sorted({a for a in algos if algos.count(a) > 1})
    if twice:
        raise UserError(f"tune: --algo lists '{twice[0]}' twice; list each method once")
    for name in algos:
        tune_space.method_spec(name)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise UserError(f"tune: --trials {trials}: pass a whole number >= 1 (the trials every method gets)")
    if objective not in DIRECTIONS:
        raise UserError(f"tune: --objective '{objective}': choose one of {', '.join(DIRECTIONS)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 0:
        raise UserError(f"tune: --seeds {seeds}: pass a whole number >= 0 (0: tune only, re-train nothing)")
    if tune_epochs is not None and (isinstance(tune_epochs, bool) or not isinstance(tune_epochs, int)
                                    or tune_epochs < 1):
        raise UserError(f"tune: --tune-epochs {tune_epochs}: pass a whole number >= 1")
    for key in RESERVED:
        if key in base and key != "out":
            raise UserError(f"tune: --{key} is not a tune's: a tune run again on its --out continues by itself")


def tune(algos: Sequence[str], trials: int, out: str | Path, base: Mapping[str, Any] | None = None, *,
         storage: str | None = None, objective: str = "top1", seeds: int = 3,
         tune_epochs: int | None = None, per_method: Mapping[str, Mapping[str, Any]] | None = None) -> TuneResult:
    """Tune every method of ``algos`` with ``trials`` trials, then re-train each best config on ``seeds`` seeds;
    the Python API of ``distillistic tune``. ``base`` holds the config keys the user set (fixed, not tuned);
    ``per_method`` the keys fixed for one method only (``{"dml": {"students": 2}}``), not tuned either."""
    base = {k: v for k, v in (base or {}).items() if k != "out"}
    check_options(list(algos), trials, objective, seeds, tune_epochs, base)
    fixed = {m: keys for m, keys in check_per_method(per_method or {}, base).items() if m in algos}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"tune: --out '{out}' is a file; choose a directory")
    tuner = Tuner(algos, trials, out, base, storage, objective, seeds, tune_epochs, fixed)
    tuner.check_methods()
    expand(tuner.sweep_spec({m: {} for m in tuner.algos}), source="tune")  # every method's config, checked
    tuner.open()
    result = TuneResult(out)
    try:
        for method in tuner.algos:
            tuner.pin_teachers(method)
            log.info("tune %s: %d trials over %s", method, trials, ", ".join(tuner.spaces[method]))
            waiting = tuner.tune_method(method)
            if waiting:
                result.waiting[method] = waiting
    except (TrialStopped, TeacherStopped) as e:
        log.info("%s", e)
        result.interrupted = True
        return result
    result.methods = {m: tuner.best(m) for m in tuner.algos}
    atomic_write_json(out / "tune.json", {"objective": objective, "direction": DIRECTIONS[objective],
                                          "trials": trials, "tune_epochs": tuner.tune_epochs, "tuning_seed":
                                          tuner.seed, "seeds": tuner.seeds, "storage": tuner.url,
                                          "methods": result.methods})
    missing = [m for m, e in result.methods.items() if "best_params" not in e]
    if result.waiting or not seeds:
        return result
    if missing:
        raise UserError(f"tune: no trial of '{missing[0]}' finished (all pruned or diverged); raise --trials or "
                        "--tune-epochs, or fix its flags")
    result.sweep = tuner.retrain(result.methods)
    return result


def describe(result: TuneResult, objective: str = "top1") -> str:
    """A line per method (trials by state, the best value and config), then the re-training's lines."""
    lines = []
    for method, entry in result.methods.items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(entry["trials"].items()))
        best = ""
        if "best_params" in entry:
            params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in entry["best_params"].items())
            best = f"; best val {objective} {entry['best_value']:.4f} (trial {entry['best_trial']}): {params}"
        lines.append(f"{method}: {sum(entry['trials'].values())} trials ({counts}){best}")
    if result.interrupted:
        lines.append(f"tune {result.out}: interrupted; run the same command again to continue (finished trials "
                     "are kept)")
    for method, n in result.waiting.items():
        lines.append(f"{method}: {n} trials still run in other workers; run this command again once they end "
                     "to re-train the best configurations")
    if result.sweep is not None:
        from distillistic.experiments.sweep import describe as describe_sweep

        lines.append(describe_sweep(result.sweep))
    elif result.methods and not result.waiting:
        lines.append(f"re-training skipped (--seeds 0); the best configurations are in {result.out / 'tune.json'}")
    return "\n".join(lines)


def tune_command(config: str | None, given: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, int]:
    """``distillistic tune``: the config file's keys and the flags (fixed keys, ``--algo A,B``, ``--out DIR``)
    and the tune's own options -> the text to print and the exit code."""
    from distillistic.runs.rundir import stop_exit_code

    read = config_mod.read_yaml(config) if config else {}
    base = {str(k).replace("-", "_"): v for k, v in read.items()} | dict(given)
    out = base.pop("out", None)
    per_method = base.pop(PER_METHOD, None) or {}
    if not out:
        raise UserError("tune: pass --out DIR (the tune's folder: its studies, trials and re-trained runs)")
    algos = config_mod.split_names(str(base.pop("algo", "") or ""))
    result = tune(algos, out=out, base=base, per_method=per_method, **options)
    stopped = result.interrupted or (result.sweep is not None and result.sweep.interrupted)
    code = stop_exit_code() if stopped else (1 if result.sweep and result.sweep.failures else 0)
    return describe(result, str(options.get("objective", "top1"))), code
