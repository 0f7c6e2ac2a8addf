"""``distillistic predict FILE IMAGES...``: the top-k classes of image files from any exported student.

``FILE`` is an ``.onnx`` export (run by ONNX Runtime), a ``.safetensors`` export or a run directory (run by
PyTorch through :func:`~distillistic.deploy.students.load_student`). Each image is decoded with PIL, made
grayscale or RGB as the run's data, centre-cropped as the run's evaluation did for image folders, and given
at its own size to the model, whose graph resizes it to the run's input size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distillistic.deploy.graph import Inputs
from distillistic.errors import DataError, UserError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
Scorer = Callable[[np.ndarray], np.ndarray]  # uint8 [1, C, H, W] -> logits [1, K]


def image_files(items: Sequence[str]) -> list[Path]:
    """The image files named by ``items`` (files, or folders searched recursively for image suffixes)."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not inside:
                raise UserError(f"predict: folder '{path}' holds no image files ({', '.join(sorted(SUFFIXES))})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"predict: '{path}' does not exist; pass image files or a folder of them")
    return found


def read_image(path: Path, inputs: Inputs) -> np.ndarray:
    """uint8 ``[1, C, H, W]`` of an image file, as the run read its data; one line if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    try:
        with Image.open(path) as f:
            img = f.convert("L" if inputs.channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image file '{path}' cannot be decoded ({type(e).__name__}); remove or replace it") from None
    if inputs.center_crop:  # the run's evaluation of image files: Resize(S * 256 / 224) + CenterCrop(S)
        s = inputs.image_size
        img = center_crop(resize(img, round(s * 256 / 224), InterpolationMode.BILINEAR), [s, s])
    return pil_to_tensor(img).unsqueeze(0).numpy()


def scorer(path: Path) -> tuple[Scorer, Inputs, tuple[str, ...]]:
    """A function from uint8 images to logits for ``path`` (.onnx, .safetensors or run directory)."""
    if path.suffix == ".onnx":
        from distillistic.deploy.onnx_export import onnx_inputs, read_onnx, require, session

        require("predict with an .onnx file")
        _, props = read_onnx(path)
        inputs, names = onnx_inputs(props, path)
        sess = session(path)
        return (lambda x: np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])), inputs, names
    from distillistic.deploy.students import load_student

    module = load_student(path)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run, module.inputs, module.class_names


def predict(model: Path, items: Sequence[str], k: int = 5) -> list[tuple[Path, list[tuple[str, float]]]]:
    """For every image of ``items``: its ``k`` most probable classes with their probabilities."""
    if k < 1:
        raise UserError(f"predict: --top {k}: pass a whole number >= 1")
    if not model.exists():
        raise UserError(f"predict: '{model}' does not exist; pass an .onnx or .safetensors export or a run directory")
    files = image_files(items)
    run, inputs, names = scorer(model)
    out = []
    for path in files:
        z = torch.from_numpy(run(read_image(path, inputs))).double()[0]
        p = z.softmax(0)
        # a stable sort: of tied classes (an int8 model's logits can tie) the first comes first, as argmax
        values, order = torch.sort(p, descending=True, stable=True)
        out.append((path, [(names[i], float(v)) for v, i in zip(values[:k].tolist(), order[:k].tolist())]))
    return out


def lines(results: list[tuple[Path, list[tuple[str, float]]]]) -> list[str]:
    """One line per image: ``path: class p, class p, ...``."""
    return [f"{path}: " + ", ".join(f"{name} {p:.4f}" for name, p in top) for path, top in results]
