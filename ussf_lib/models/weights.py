"""Load a local state dict into a built model, skipping a classifier head of another size.

Nothing is downloaded: weights come only from a file the user names.
Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ussf_lib.errors import UserError

#: Keys under which training checkpoints commonly nest the state dict.
_NESTED_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
#: Key prefixes added by wrappers: ``nn.DataParallel`` / DDP and ``torch.compile``.
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def _as_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """The tensor mapping in ``obj``: itself, or nested under a common checkpoint key; wrapper prefixes removed."""
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} holds no state dict; save one with torch.save(model.state_dict(), path)")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _examples(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_weights(model: nn.Module, path: str | Path, *, head: str, model_name: str = "the model") -> list[str]:
    """Load the state dict saved at ``path`` into ``model`` in place; return the head keys left out.

    Keys under ``head`` (the dotted path of the classifier, e.g. ``"fc"``) whose shape differs from the
    model's, or which the model lacks, are dropped, so the model keeps its freshly initialised head of
    ``num_classes`` outputs; a file without head keys (a backbone) is accepted too. Every other key must
    match by name and shape, else :class:`UserError` says how the file differs.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"weights file {path} is a folder; pass the state-dict file itself (.pt / .pth)")
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass the path of a saved state dict (.pt / .pth)")
    try:
        with warnings.catch_warnings():  # torch warns about what it then refuses; the error below says it once
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise UserError(f"weights file {path} is not a loadable PyTorch file ({type(exc).__name__}); "
                        f"save it with torch.save(model.state_dict(), path)") from exc
    state = _as_state_dict(obj, path)
    own = model.state_dict()
    prefix = head + "."
    skipped = [k for k, v in state.items() if k.startswith(prefix) and (k not in own or own[k].shape != v.shape)]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and not k.startswith(prefix)]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(missing)} missing ({_examples(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else "",
                 f"{len(reshaped)} of another shape ({_examples(reshaped)})" if reshaped else ""]
        raise UserError(f"weights file {path} does not fit {model_name}: keys "
                        f"{'; '.join(p for p in parts if p)}; use weights saved from {model_name} "
                        f"(at the same image size for ViT)")
    model.load_state_dict(state, strict=False)  # only head keys can be absent here
    if skipped:  # said once per command (the CLI prints a warning once per place), not per fold
        warnings.warn(f"{path}: its classifier head does not fit this {model_name} (another number of classes); "
                      f"kept a freshly initialised head (skipped {_examples(skipped)})", stacklevel=2)
    return skipped
