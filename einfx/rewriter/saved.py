"""`save` and `load`: a structured model as a folder that rebuilds it with identical outputs.

    folder/
      einfx.json          the manifest: format version, the base model, every structured module by path
      model.safetensors   the whole state dict (tied tensors once)
      config.json         Hugging Face models: the config, with the manifest under the key "einfx"

For a Hugging Face model, `save` is ``model.save_pretrained(folder)`` with the manifest in its config, so a
user's own ``save_pretrained`` on an optimized model writes the same folder and `load` reads either. The
base model is rebuilt from what the manifest names: a transformers class and its config.json (no
``from_pretrained``, no remote code), a zoo spec (``torchvision:NAME``, ``timm:NAME``, ``hf:TYPE?...``),
or a fresh instance the caller passes. No pickle is read anywhere.

Only models whose structured layers live in the module tree (what `einfx.optimize` returns as the user's
class) are saved; a graph module is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any

import torch
from torch import fx, nn

from einfx.errors import SavedModelError
from einfx.rewriter.attention import FusedSelfAttention
from einfx.rewriter.substitute import _fused_attention, _set
from einfx.layers.linear import EinsumLinear
from einfx.structures.structure import Structure
from einfx.zoo import build_model, parse_spec

__all__ = ["save", "load", "manifest", "is_hf_model", "MANIFEST", "WEIGHTS", "FORMAT_VERSION"]

MANIFEST = "einfx.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "einfx-structured-model"
FORMAT_VERSION = 1


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (without importing transformers: a model of it means it is loaded)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _dtype_name(module: nn.Module) -> str:
    p = next(iter(module.parameters()), None)
    return str(p.dtype).removeprefix("torch.") if p is not None else "float32"


def manifest(model: nn.Module, base: str | None = None) -> dict:
    """The manifest of ``model``: its base and each structured module (EinsumLinear, FusedSelfAttention)."""
    modules: dict[str, dict] = {}
    for path, m in model.named_modules():
        if isinstance(m, EinsumLinear):
            modules[path] = {"type": "EinsumLinear", "structure": m.structure.to_dict(), "d_in": m.in_features,
                             "d_out": m.out_features, "bias": m.bias is not None, "order": m.order,
                             "dtype": _dtype_name(m)}
        elif isinstance(m, FusedSelfAttention):
            modules[path] = {"type": "FusedSelfAttention", "num_heads": m.num_heads, "head_dim": m.head_dim,
                             "dropout": m.attn_drop.p, "batch_first": m.batch_first}
    if base is not None:
        source = {"kind": "spec", "spec": base}
    elif is_hf_model(model):
        source = {"kind": "transformers", "class": type(model).__name__}
    elif getattr(model, "einfx_spec", None):
        source = {"kind": "spec", "spec": str(model.einfx_spec)}
    else:
        source = {"kind": "instance", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    return {"format": FORMAT, "version": FORMAT_VERSION, "base": source, "modules": modules,
            "fold_to_dense": bool(getattr(model, "einfx_fold_to_dense", True))}


def save(model: nn.Module, path: str | os.PathLike, *, base: str | None = None) -> str:
    """Write ``model`` (from `einfx.optimize`) to the folder ``path``, atomically; returns the folder.

    Args:
        model: a model whose structured layers are submodules (the user's class, as optimize returns it).
        path: the folder; an existing einfx or Hugging Face folder there is replaced whole.
        base: a zoo spec that rebuilds the base model (``"torchvision:vit_b_16"``) when it is not a
            Hugging Face model; without one, `load` needs a fresh instance of the model's class.

    Raises:
        SavedModelError: a graph module, or a folder in the way that is not a saved model.
    """
    if isinstance(model, fx.GraphModule):
        raise SavedModelError(
            f"einfx.save: {type(model).__name__} is a graph module (einfx.optimize returns one only for "
            "functional linear sites); its graph cannot be rebuilt from a manifest. Save the base model and the "
            "policy and rerun einfx.optimize, or serialize the graph with torch.export.save.")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise SavedModelError(f"einfx.save: cannot write {path}: folder {parent!r} does not exist")
    if os.path.exists(path) and not _is_saved_folder(path):
        raise SavedModelError(f"einfx.save: {path} exists and is not a saved model folder (no {MANIFEST} or "
                              f"{CONFIG}); choose another path or remove it")
    info = manifest(model, base)
    tmp = tempfile.mkdtemp(prefix=".einfx-save-", dir=parent)
    try:
        if info["base"]["kind"] == "transformers":
            previous = getattr(model.config, "einfx", None)
            model.config.einfx = info
            try:
                model.save_pretrained(tmp)
            finally:
                model.config.einfx = previous
        else:
            from safetensors.torch import save_model

            save_model(model, os.path.join(tmp, WEIGHTS))
            with open(os.path.join(tmp, MANIFEST), "w") as fh:
                json.dump(info, fh, indent=2)
        _replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_saved_folder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in (MANIFEST, CONFIG))


def _replace(tmp: str, path: str) -> None:
    """Move the finished folder into place; an old folder is moved aside first and deleted after."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _read_json(file: str) -> dict:
    try:
        with open(file) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise SavedModelError(f"einfx.load: cannot read {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SavedModelError(f"einfx.load: {file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SavedModelError(f"einfx.load: {file} holds a {type(data).__name__}, expected a JSON object")
    return data


def _read_manifest(path: str) -> tuple[dict, str]:
    if not os.path.isdir(path):
        raise SavedModelError(f"einfx.load: {path} is not a folder (einfx.save writes a folder)")
    file = os.path.join(path, MANIFEST)
    if os.path.exists(file):
        info = _read_json(file)
    elif os.path.exists(os.path.join(path, CONFIG)):
        file = os.path.join(path, CONFIG)
        info = _read_json(file).get("einfx")
        if not isinstance(info, dict):
            raise SavedModelError(f"einfx.load: {file} has no 'einfx' entry: the folder holds a plain Hugging "
                                  "Face model, not one saved after einfx.optimize (load it with from_pretrained)")
    else:
        raise SavedModelError(f"einfx.load: {path} has neither {MANIFEST} nor {CONFIG}")
    if info.get("format") != FORMAT:
        raise SavedModelError(f"einfx.load: {file} is not an einfx manifest (format {info.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if info.get("version") != FORMAT_VERSION:
        raise SavedModelError(f"einfx.load: {file} has format version {info.get('version')!r}; this einfx reads "
                              f"version {FORMAT_VERSION}")
    if not isinstance(info.get("modules"), dict) or not isinstance(info.get("base"), dict):
        raise SavedModelError(f"einfx.load: {file} lacks its 'modules' or 'base' entry")
    return info, file


def _base_model(path: str, info: dict, file: str, model: nn.Module | None) -> nn.Module:
    base = info["base"]
    if model is not None:
        return model
    kind = base.get("kind")
    if kind == "transformers":
        import transformers
        from transformers import AutoConfig, PreTrainedModel

        config_file = os.path.join(path, CONFIG)
        if "auto_map" in _read_json(config_file):
            raise SavedModelError(f"einfx.load: {config_file} names remote code (auto_map); einfx never runs it")
        cls = getattr(transformers, str(base.get("class")), None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise SavedModelError(f"einfx.load: {file} names the model class {base.get('class')!r}, which is not a "
                                  f"transformers {transformers.__version__} model class")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises several types for a bad config
            raise SavedModelError(f"einfx.load: {config_file} is not a valid config: {exc}") from exc
        return cls(config)
    if kind == "spec":
        return build_model(parse_spec(str(base.get("spec")))).module
    raise SavedModelError(f"einfx.load: {file} was saved from a {base.get('class', 'model')} that einfx cannot "
                          "rebuild by itself; pass model=<a fresh instance of that class> (or save with "
                          "base='zoo:NAME')")


def _apply(model: nn.Module, modules: dict[str, Any], file: str) -> None:
    """Rebuild the structured modules of the manifest in ``model`` (attention first, then the layers)."""
    order = sorted(modules.items(), key=lambda kv: (kv[1].get("type") != "FusedSelfAttention", kv[0].count(".")))
    for path, spec in order:
        where = f"einfx.load: {file}: module {path!r}"
        try:
            target = model.get_submodule(path)
        except AttributeError as exc:
            raise SavedModelError(f"{where} does not exist in the base model {type(model).__name__}") from exc
        kind = spec.get("type")
        if kind == "FusedSelfAttention":
            if not isinstance(target, nn.MultiheadAttention):
                raise SavedModelError(f"{where} is a {type(target).__name__} in the base model, expected "
                                      "nn.MultiheadAttention")
            _set(model, path, _fused_attention(target, None, None))
        elif kind == "EinsumLinear":
            try:
                structure = Structure.from_dict(spec["structure"])
                dtype = getattr(torch, spec.get("dtype", "float32"))
                layer = EinsumLinear(int(spec["d_in"]), int(spec["d_out"]), structure, bias=bool(spec["bias"]),
                                     name=path, dtype=dtype)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise SavedModelError(f"{where}: bad layer entry {spec!r}: {exc}") from exc
            if spec.get("order", "auto") != "auto":
                layer.set_order(spec["order"])
            _set(model, path, layer)
        else:
            raise SavedModelError(f"{where}: unknown module type {kind!r}; valid: EinsumLinear, FusedSelfAttention")


def _hf_names(model: nn.Module, saved: dict, file: str) -> dict:
    """Keys as ``save_pretrained`` writes them (transformers' original checkpoint names) -> the model's own
    names, by the model's renaming rules; a key that needs a value conversion is refused with its name."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without checkpoint conversions: the names are the model's
        return saved
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out = {}
    for key, value in saved.items():
        new, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            raise SavedModelError(f"einfx.load: {file}: key {key!r} needs the transformers weight conversion "
                                  f"{pattern!r}, which einfx does not apply to structured layers")
        out[new] = value
    return out


def _load_weights(model: nn.Module, file: str) -> None:
    from safetensors.torch import load_file

    if not os.path.exists(file):
        raise SavedModelError(f"einfx.load: the weights file {file} is missing")
    try:
        saved = load_file(file, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise SavedModelError(f"einfx.load: the weights file {file} is corrupt or unreadable: "
                              f"{type(exc).__name__}: {exc}") from exc
    if is_hf_model(model):
        saved = _hf_names(model, saved, file)
    state = model.state_dict()
    unexpected = sorted(set(saved) - set(state))
    wrong = sorted(k for k in saved if k in state and tuple(saved[k].shape) != tuple(state[k].shape))
    loaded_ids = {id(p) for k, p in model.state_dict(keep_vars=True).items() if k in saved}
    missing = sorted(k for k, p in model.state_dict(keep_vars=True).items()
                     if k not in saved and id(p) not in loaded_ids)
    if unexpected or wrong or missing:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}" + (f" and {len(unexpected) - 5} more"
                                                            if len(unexpected) > 5 else ""))
        if wrong:
            details.append("wrong shapes " + ", ".join(f"{k}: file {tuple(saved[k].shape)} vs model "
                                                       f"{tuple(state[k].shape)}" for k in wrong[:5]))
        raise SavedModelError(f"einfx.load: {file} does not match the rebuilt {type(model).__name__}: "
                              + "; ".join(details))
    model.load_state_dict(saved, strict=False)


def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by `save` (or by ``save_pretrained`` after `einfx.optimize`), in eval mode.

    Args:
        path: the folder.
        model: a fresh instance of the base model to rebuild into (modified in place); needed only when the
            manifest names neither a transformers class nor a zoo spec.

    Raises:
        SavedModelError: a missing, corrupt or mismatched file, named with what is wrong.
    """
    path = os.path.abspath(os.fspath(path))
    info, file = _read_manifest(path)
    built = _base_model(path, info, file, model)
    _apply(built, info["modules"], file)
    _load_weights(built, os.path.join(path, WEIGHTS))
    built.einfx_fold_to_dense = bool(info.get("fold_to_dense", True))
    return built.eval()
