"""Loading files without running code from them.

Every file moecnn reads that could carry code is read here:

- checkpoints and state dicts: ``torch.load(..., weights_only=True)`` (tensors, plain containers, numbers and
  strings only), or safetensors files, which hold tensors alone;
- the official CIFAR "python version" archives, which are pickles: a restricted unpickler admits only the
  builtins and numpy types those files contain.

A crafted file is refused with one line that names it; nothing in it runs.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Dict, Mapping

import torch

REFUSED = ("refusing to load '{path}': it holds objects other than tensors and plain containers ({why}); "
           "moecnn never runs code from a file — re-create it with moecnn, or export plain tensors (a state_dict "
           "or a .safetensors file)")


class UnsafeFileError(RuntimeError):
    """A file asked to run code (or to build an object outside the allowed types) while loading."""


def _numpy_globals() -> list:
    """numpy array reconstruction, admitted so that checkpoints written by moecnn 0.1 (numpy RNG state inside)
    still load; these build arrays and dtypes only."""
    import numpy as np

    out = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = __import__(mod, fromlist=["_reconstruct"])
            out.append(m._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "uint8")]
    return out


def torch_load(path, map_location="cpu", what: str = "checkpoint") -> Any:
    """``torch.load`` restricted to tensors and plain containers; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "GLOBAL" in msg or "Unsupported global" in msg:  # the file names a callable to run or build
            why = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "global" in ln), "")
            raise UnsafeFileError(REFUSED.format(path=path, why=why[:160] or "unsupported object")) from None
        raise RuntimeError(f"{what} '{path}' is corrupt or not a torch file ({msg.splitlines()[0][:120]}); "
                           f"delete it and retrain, or point to another file") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"{what} '{path}' is corrupt or truncated ({type(e).__name__}: {first}); "
                           f"delete it and retrain, or point to another file") from None


def read_state_dict(path, what: str = "weights file") -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict, or a checkpoint dict with a
    ``model``/``state_dict``/``model_state_dict`` entry); a leading ``module.`` (DDP) is stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"{what} '{path}' not found")
        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise RuntimeError(f"{what} '{path}' is not a readable safetensors file ({e})") from None
    else:
        obj = torch_load(path, what=what)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} '{path}': expected a state dict of tensors (or a checkpoint with a 'model' entry)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------ pickles
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_ALLOWED:
            mod = module.replace("numpy.core.", "numpy._core.") if module.startswith("numpy.core") else module
            try:
                m = __import__(mod, fromlist=[name])
            except ImportError:
                m = __import__(module, fromlist=[name])
            return getattr(m, name)
        raise _Refused(f"global '{module}.{name}' is not allowed")


class _Refused(pickle.UnpicklingError):
    pass


def load_pickle(path, encoding: str = "latin1") -> Any:
    """Unpickle a data file (e.g. the official CIFAR archives) admitting only builtins and numpy arrays."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _Refused as e:
        raise UnsafeFileError(f"refusing to unpickle '{path}': {e} (only builtins and numpy arrays may appear in "
                              f"a data pickle; nothing from the file was run)") from None
    except Exception as e:
        raise ValueError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from None
