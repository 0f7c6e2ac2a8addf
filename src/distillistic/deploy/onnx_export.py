"""The student as an ONNX model through PyTorch's own exporter (``torch.onnx.export(dynamo=True)``).

The graph is :class:`~distillistic.deploy.graph.Preprocessed`: input ``images`` uint8 ``[batch, C, H, W]``
(batch, height and width dynamic), output ``logits`` ``[batch, K]``. Its metadata (``metadata_props``) says
what it is: class names, input size and channels, the run's config hash, the distillistic version.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from distillistic.deploy.graph import Inputs, Preprocessed
from distillistic.errors import UserError
from distillistic.fileio import atomic_write, one_line_of

EXTRA = ("onnx", "onnxruntime", "onnxscript")
INPUT, OUTPUT = "images", "logits"


def require(what: str) -> None:
    """Refuse ``what`` in one line when the optional extra ``deploy`` is not installed."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}, the optional extra 'deploy': pip install "
                        "'distillistic[deploy]'")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter's and the quantizer's progress lines and log records kept off the terminal."""
    sink = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.disable(previous)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a run's resolved config as canonical JSON (sorted keys): the same run, the same hash."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("distillistic")
    except PackageNotFoundError:
        return "unknown"


def metadata(module: Preprocessed, name: str, arch: str, config: Mapping[str, Any], precision: str) -> dict[str, str]:
    """The model's ``metadata_props``: every value a string (JSON where it is not one)."""
    return {"distillistic_version": version(), "name": name, "arch": arch, "precision": precision,
            "class_names": json.dumps(list(module.class_names)), "input_size": str(module.inputs.image_size),
            "input_channels": str(module.inputs.channels), "inputs": json.dumps(module.inputs.to_json()),
            "config_sha256": config_hash(config), "input_format": "uint8 NCHW, 0-255, any H x W"}


def _operator(error: BaseException) -> str | None:
    """The operator an exporter error is about (``aten::foo``, ``namespace.op``), when it names one."""
    text = "\n".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    for pattern in (r"aten::[\w.]+", r"torch\.ops\.([\w]+\.[\w]+)", r"OpOverload\(op='([\w.]+)'",
                    r"\b([a-z_]\w*::\w+)"):
        if m := re.search(pattern, text):
            return m.group(m.lastindex or 0)
    return None


def export_onnx(module: Preprocessed, path: Path, props: Mapping[str, str], label: str) -> None:
    """Write ``module`` as ONNX to ``path`` (atomically) with ``props`` as its metadata; one line if it cannot."""
    import onnx

    inp = module.inputs
    example = torch.randint(0, 256, (2, inp.channels, inp.image_size, inp.image_size), dtype=torch.uint8)
    batch, height, width = (torch.export.Dim(n, min=1) for n in ("batch", "height", "width"))
    shapes = {"images": {0: batch, 2: height, 3: width}}
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(module.eval(), (example,), dynamo=True, dynamic_shapes=shapes,
                                        input_names=[INPUT], output_names=[OUTPUT], verbose=False)
    except Exception as e:  # the exporter's errors have no common type
        op = _operator(e)
        what = f"operator '{op}' is not supported" if op else one_line_of(e)
        raise UserError(f"export: the ONNX exporter cannot trace '{label}': {what}; export it as .safetensors "
                        "(--format safetensors) or replace that operation in the model") from None
    if program is None:
        raise UserError(f"export: the ONNX exporter returned no model for '{label}'")
    model = program.model_proto
    onnx.helper.set_model_props(model, dict(props))
    atomic_write(path, model.SerializeToString())


def read_onnx(path: Path) -> tuple[Any, dict[str, str]]:
    """The checked ``onnx.ModelProto`` of ``path`` and its metadata; one line for a missing or corrupt file."""
    import onnx

    if not path.is_file():
        raise UserError(f"'{path}' does not exist; pass an .onnx file of 'distillistic export --format onnx'")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # DecodeError, ValidationError, ...: the file is user input
        raise UserError(f"'{path}' is not a readable ONNX model ({one_line_of(e)}); export it again") from None
    return model, {p.key: p.value for p in model.metadata_props}


def session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    read_onnx(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"'{path}' cannot be run by ONNX Runtime ({one_line_of(e)}); export it again") from None


def onnx_inputs(props: Mapping[str, str], path: Path) -> tuple[Inputs, tuple[str, ...]]:
    """What an exported model reads and its class names, from its metadata."""
    try:
        return Inputs.from_json(json.loads(props["inputs"])), tuple(json.loads(props["class_names"]))
    except (KeyError, ValueError, TypeError):
        raise UserError(f"'{path}' is not an ONNX export of distillistic (its metadata has no inputs and "
                        "class names); export it with 'distillistic export RUN --format onnx'") from None
