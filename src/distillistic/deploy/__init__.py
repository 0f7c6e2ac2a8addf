"""The student as a deliverable: ONNX and int8 exports checked for parity, benchmarks, predictions.

* :mod:`~distillistic.deploy.graph`: the student with its input pipeline (resize, normalisation) inside, taking
  the uint8 images a user has; :mod:`~distillistic.deploy.students` rebuilds it from a run or a ``.safetensors``;
* :mod:`~distillistic.deploy.onnx_export`: PyTorch's exporter, metadata, a corrupt file named;
* :mod:`~distillistic.deploy.evaluate`: a model run on a split (parity, top-1, ECE, NLL);
* :mod:`~distillistic.deploy.quantize`: static int8 (QDQ) with ONNX Runtime, calibrated on training images;
* :mod:`~distillistic.deploy.bench`: latency and throughput on CPU with a stated thread count;
* :mod:`~distillistic.deploy.predict`: top-k classes of image files;
* :mod:`~distillistic.deploy.pipeline`: ``distillistic export --format onnx`` and its ``export.json``.

onnx, onnxruntime and onnxscript are the optional extra ``distillistic[deploy]``; only the ONNX parts need it.
"""
