"""Static post-training int8 quantization of an ONNX export with ONNX Runtime's tooling (QDQ format).

Weights are quantized per output channel (int8, symmetric), activations per tensor (int8) with ranges
calibrated (MinMax) on images of the run's **training** split, read as evaluation reads them. Only the
arithmetic is quantized (Conv, MatMul, Gemm): the input pipeline in front of the model stays in float.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from distillistic.deploy.onnx_export import INPUT, quiet
from distillistic.errors import UserError
from distillistic.fileio import atomic_write, one_line_of

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
METHOD = "ONNX Runtime quantize_static, QDQ, int8 weights (per channel) and activations, MinMax calibration"


def _reader(images: Iterable[Tensor]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[Tensor] = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch.numpy()}

    return Reader()


def quantize_int8(fp32: Path, out: Path, calibration: Iterable[Tensor], props: Mapping[str, str]) -> None:
    """Write the int8 model of ``fp32`` to ``out`` (atomically) with metadata ``props``, calibrated on uint8
    image batches."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    tmp = out.with_name(out.name + ".quantizing")
    try:
        with quiet():
            quantize_static(str(fp32), str(tmp), _reader(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=QUANTIZED_OPS, calibrate_method=CalibrationMethod.MinMax)
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, dict(props))
        atomic_write(out, model.SerializeToString())
    except UserError:
        raise
    except Exception as e:  # the quantizer's errors have no common type
        raise UserError(f"export: int8 quantization of '{fp32}' failed ({one_line_of(e)})") from None
    finally:
        tmp.unlink(missing_ok=True)
        for extra in tmp.parent.glob(tmp.name + "*"):  # calibration leftovers (augmented models)
            extra.unlink(missing_ok=True)
