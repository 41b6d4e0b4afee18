"""Write a fold checkpoint as an ONNX model (``ussf export``), checked against PyTorch with onnxruntime.

The ONNX model takes the *normalized* image batch and returns softmax probabilities:

* input ``input``: float32 ``(N, 3, S, S)``, N free (a dynamic batch axis), S the checkpoint's ``image_size``;
  an image becomes a row of it as in training and in ``ussf predict``: decoded to RGB, resized to S x S
  (bilinear), divided by 255, then standardized per channel with the checkpoint's ``mean`` and ``std``;
* output ``probabilities``: float32 ``(N, n_classes)``, the softmax of the network's logits, classes in the
  checkpoint's order.

What the preprocessing needs (model name, classes, image size, mean, std) is also written into the model's
``metadata_props`` (:data:`METADATA_KEYS`), so the file alone is enough to use it. The graph comes from torch's
dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``): US-SFNet's ``rfft2`` / ``irfft2`` become ONNX
``DFT`` operators. Before the file is written, onnxruntime runs it on random inputs of another batch size than
the export's and its probabilities must match PyTorch's to :data:`TOLERANCE`; a model the exporter cannot
convert, or whose conversion disagrees, is a :class:`UserError` and nothing is written.

``onnx``, ``onnxscript`` and ``onnxruntime`` are the optional ``export`` extra: ``pip install -e '.[export]'``.
No notebook exports a model; see docs/predict-and-export.md.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ussf_lib.errors import UserError
from ussf_lib.training.checkpoints import load_checkpoint

#: Formats ``ussf export --format`` writes.
FORMATS: tuple[str, ...] = ("onnx",)

#: Largest absolute difference allowed between onnxruntime's and PyTorch's probabilities.
TOLERANCE = 1e-4

#: Names of the ONNX graph's input and output.
INPUT_NAME, OUTPUT_NAME = "input", "probabilities"

#: Keys written into the ONNX model's ``metadata_props`` (values are strings; lists are JSON).
METADATA_KEYS: tuple[str, ...] = ("model_name", "classes", "image_size", "mean", "std", "input", "output",
                                  "preprocessing")

#: The packages of the ``export`` extra (import name, pip name).
_EXTRA = (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"))


class SoftmaxModel(nn.Module):
    """``softmax(model(x), dim=1)``: what the exported graph computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.model(x), dim=1)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured."""

    path: Path
    model_name: str
    classes: list[str]
    image_size: int
    opset: int
    max_abs_diff: float  #: largest |onnxruntime - PyTorch| over the check's probabilities


def require_export_packages() -> None:
    """Raise :class:`UserError` naming the ``export`` extra when one of its packages is not installed."""
    import importlib.util

    missing = [pip for module, pip in _EXTRA if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"exporting to ONNX needs {', '.join(missing)}; install the export extra: "
                        "pip install -e '.[export]'")


def metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` of the exported model, from a checkpoint's ``meta`` (:data:`METADATA_KEYS`)."""
    size = int(meta["image_size"])
    return {
        "model_name": str(meta["model_name"]),
        "classes": json.dumps(list(meta["classes"])),
        "image_size": str(size),
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "input": f"{INPUT_NAME}: float32 (N, 3, {size}, {size}), normalized as in preprocessing",
        "output": f"{OUTPUT_NAME}: float32 (N, {len(meta['classes'])}), softmax over classes, in the order of classes",
        "preprocessing": f"RGB, resized to {size}x{size} (bilinear), divided by 255, then (x - mean) / std per "
                         "channel; NCHW",
    }


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name for --out, e.g. {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder; create it or choose another --out")


def _to_onnx(wrapped: nn.Module, example: Tensor, model_name: str) -> Any:
    """torch's dynamo-based ONNX export with a dynamic batch axis; a failure is one :class:`UserError` line."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():  # the exporter's own notes; a failure is reported below
            warnings.simplefilter("ignore")
            return torch.onnx.export(wrapped, (example,), dynamo=True, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # the exporter raises many types (torch.export, onnxscript, dispatch errors)
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise UserError(f"model {model_name!r} cannot be exported to ONNX ({type(exc).__name__}: {first[:160]}); "
                        "use its checkpoint with `ussf predict` instead") from None


def max_difference(onnx_path: str | Path, wrapped: nn.Module, inputs: Tensor) -> float:
    """Largest absolute difference between onnxruntime's outputs for ``inputs`` and ``wrapped``'s."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ours,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})
    with torch.inference_mode():
        theirs = wrapped(inputs).numpy()
    return float(np.abs(ours.astype(np.float64) - theirs).max())


def export_model(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", check_batch: int = 3,
                 seed: int = 0) -> ExportResult:
    """Write the model of one fold checkpoint to ``out`` as ONNX (see the module's docstring for its input,
    output and ``metadata_props``), after checking that onnxruntime's probabilities for ``check_batch``
    random inputs match PyTorch's to :data:`TOLERANCE`.

    The export traces a batch of 2, so ``check_batch`` (3) also checks the dynamic batch axis. ``out`` is
    replaced whole or not at all.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    require_export_packages()
    out = Path(out)
    _check_out(out)
    model, meta = load_checkpoint(checkpoint, "cpu")
    wrapped = SoftmaxModel(model.float()).eval()
    size, name = int(meta["image_size"]), str(meta["model_name"])
    gen = torch.Generator().manual_seed(seed)
    program = _to_onnx(wrapped, torch.randn(2, 3, size, size, generator=gen), name)
    program.model.metadata_props.update(metadata(meta))
    opset = int(program.model.opset_imports.get("", 0))
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        program.save(tmp)
        diff = max_difference(tmp, wrapped, torch.randn(check_batch, 3, size, size, generator=gen))
        if not diff <= TOLERANCE:  # also refuses NaN
            raise UserError(f"model {name!r} was converted, but onnxruntime's probabilities differ from PyTorch's by "
                            f"{diff:.2g} (more than {TOLERANCE:g}); nothing written, use its checkpoint with "
                            "`ussf predict` instead")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, name, list(meta["classes"]), size, opset, diff)
