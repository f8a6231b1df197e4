"""Model specs: parse ``zoo:NAME?key=value&...`` or a local weights file, and build the model locally.

Grammar (one spec per model)::

    torchvision:NAME[?k=v&...]   torchvision.models.get_model(NAME, weights=None, **kw)
    timm:NAME[?k=v&...]          timm.create_model(NAME, pretrained=False, **kw)
    hf:MODEL_TYPE[?k=v&...]      a transformers config (AutoConfig.for_model) with overrides, random weights
    PATH.safetensors[@ARCH]      a local state dict loaded into the architecture ARCH (one of the above)
    PATH.pt | PATH.pth[@ARCH]    the same, read with torch.load(weights_only=True)
    FOLDER                       a local Hugging Face model folder (config.json, safetensors weights, tokenizer
                                 files): its pretrained weights, and its tokenizer when it has one

Nothing is ever downloaded and no remote code is executed: pretrained weights are never requested,
``trust_remote_code`` is never set, and pickles are read with ``weights_only=True``.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field

from einfx.errors import ModelSpecError

__all__ = ["ZOOS", "WEIGHT_SUFFIXES", "ModelSpec", "BuiltModel", "parse_spec", "parse_overrides", "build_model"]

ZOOS = ("torchvision", "timm", "hf")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        zoo: "torchvision", "timm", "hf", "file" or "folder".
        name: the model name in its zoo, the weights path for "file", the absolute folder path for "folder".
        overrides: sorted (key, value) pairs passed to the constructor or config.
        arch: for "file", the architecture spec the weights are loaded into.
    """

    zoo: str
    name: str
    overrides: tuple[tuple[str, object], ...] = ()
    arch: "ModelSpec | None" = None

    @property
    def canonical(self) -> str:
        """The spec as text with sorted overrides: equal models give equal strings."""
        if self.zoo == "file":
            return f"{self.name}@{self.arch.canonical}" if self.arch else self.name
        if self.zoo == "folder":
            return self.name
        query = "&".join(f"{k}={_format_value(v)}" for k, v in self.overrides)
        return f"{self.zoo}:{self.name}" + (f"?{query}" if query else "")

    @property
    def slug(self) -> str:
        """A file-system-safe directory name, unique per canonical spec."""
        if self.zoo == "file":
            base = os.path.basename(self.name)
            text = f"file-{base}" + (f"-{self.arch.slug}" if self.arch else "")
        elif self.zoo == "folder":
            text = f"folder-{os.path.basename(self.name.rstrip(os.sep))}"
        else:
            text = f"{self.zoo}-{self.name}" + "".join(f"-{k}={_format_value(v)}" for k, v in self.overrides)
        safe = re.sub(r"[^A-Za-z0-9_.=\-]+", "_", text).strip("._") or "model"
        return safe[:150]

    def __str__(self) -> str:
        return self.canonical


@dataclass(frozen=True)
class BuiltModel:
    """A model built from a spec, in eval mode, with example inputs for tracing and export.

    Attributes:
        spec: the spec it was built from.
        module: the torch model (random or loaded weights).
        example_inputs: a tuple of tensors, batch size 1.
        family: "image", "video" or "text".
        info: facts for the report (input size, vocabulary size, ...).
        tokenizer: the model's own tokenizer (a local Hugging Face folder that ships one), else ``None``.
    """

    spec: ModelSpec
    module: object
    example_inputs: tuple
    family: str
    info: dict = field(default_factory=dict)
    tokenizer: object = None


def parse_overrides(query: str, where: str = "") -> tuple[tuple[str, object], ...]:
    """Parse ``k=v&k2=v2`` into sorted pairs; values become int, float, bool, None or str."""
    pairs: dict[str, object] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ModelSpecError(f"{where}: override {item!r} is not key=value (e.g. hf:gpt2?n_layer=2&n_embd=256)")
        if key in pairs:
            raise ModelSpecError(f"{where}: override {key!r} is given twice")
        pairs[key] = _parse_value(value.strip())
    return tuple(sorted(pairs.items()))


def parse_spec(text: str, arch: str | None = None) -> ModelSpec:
    """Parse one model spec.

    Args:
        text: ``zoo:NAME[?k=v&...]`` or a weights path, optionally ``PATH@ARCH``.
        arch: the architecture spec for a weights path without ``@ARCH`` (the ``--arch`` option).

    Raises:
        ModelSpecError: unknown zoo (the message lists the valid ones), bad syntax, a weights file that does
            not exist or has another suffix, or a weights file without an architecture.
    """
    raw = text.strip()
    if not raw:
        raise ModelSpecError("empty model spec")
    path, at, arch_text = raw.partition("@")
    if not at and os.path.isdir(raw):
        if not os.path.isfile(os.path.join(raw, "config.json")):
            raise ModelSpecError(f"model spec {raw!r}: the folder has no config.json; a model folder is a Hugging "
                                 "Face model directory (config.json, safetensors weights, tokenizer files)")
        return ModelSpec("folder", os.path.abspath(raw))
    if path.lower().endswith(WEIGHT_SUFFIXES) or (at and not _looks_like_zoo_spec(path)):
        return _parse_file_spec(raw, path, arch_text if at else arch)
    zoo, colon, rest = raw.partition(":")
    if not colon:
        hint = "" if os.path.sep not in raw and "." not in raw else (
            f"; a weights file must end in {', '.join(WEIGHT_SUFFIXES)}")
        raise ModelSpecError(
            f"model spec {raw!r}: expected ZOO:NAME with ZOO one of {', '.join(ZOOS)}, or a weights file{hint}")
    if zoo not in ZOOS:
        close = difflib.get_close_matches(zoo, ZOOS, n=1)
        raise ModelSpecError(
            f"model spec {raw!r}: unknown zoo {zoo!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "") + f"; valid zoos: {', '.join(ZOOS)}")
    name, _, query = rest.partition("?")
    if not _NAME.match(name):
        raise ModelSpecError(f"model spec {raw!r}: model name {name!r} is empty or has characters outside "
                             "letters, digits, '_', '-', '.'")
    return ModelSpec(zoo, name, parse_overrides(query, f"model spec {raw!r}"))


def build_model(spec: ModelSpec, tokens: int = 128) -> BuiltModel:
    """Build the model of ``spec`` on CPU in eval mode, with batch-1 example inputs.

    Args:
        spec: a parsed spec.
        tokens: sequence length of text example inputs.

    Raises:
        ModelSpecError: unknown model name (with close matches), bad constructor arguments, a corrupt or
            mismatching weights file.
    """
    if spec.zoo == "file":
        state = _read_state_dict(spec.name)  # a corrupt file fails before the model is built
        built = build_model(spec.arch, tokens)
        _load_weights(built.module, state, spec.name)
        return BuiltModel(spec, built.module, built.example_inputs, built.family, built.info)
    if spec.zoo == "folder":
        return _build_folder(spec, tokens)
    builder = {"torchvision": _build_torchvision, "timm": _build_timm, "hf": _build_hf}[spec.zoo]
    module, inputs, family, info = builder(spec, tokens)
    module.eval()
    return BuiltModel(spec, module, inputs, family, info)


# --- parsing helpers ---------------------------------------------------------------------------------------


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _format_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _looks_like_zoo_spec(text: str) -> bool:
    return text.partition(":")[0] in ZOOS


def _parse_file_spec(raw: str, path: str, arch: str | None) -> ModelSpec:
    path = os.path.normpath(path)
    if not path.lower().endswith(WEIGHT_SUFFIXES):
        raise ModelSpecError(f"model spec {raw!r}: weights file {path!r} must end in {', '.join(WEIGHT_SUFFIXES)}")
    if not os.path.isfile(path):
        raise ModelSpecError(f"model spec {raw!r}: weights file {path!r} does not exist")
    if not arch:
        raise ModelSpecError(
            f"model spec {raw!r}: a weights file needs an architecture, as PATH@SPEC or --arch SPEC "
            "(e.g. weights.safetensors@torchvision:resnet18)")
    if arch.partition("@")[0].lower().endswith(WEIGHT_SUFFIXES):
        raise ModelSpecError(f"model spec {raw!r}: the architecture {arch!r} must be a zoo spec, not a file")
    arch_spec = parse_spec(arch)
    return ModelSpec("file", path, (), arch_spec)


def _unknown_name(spec: ModelSpec, valid) -> ModelSpecError:
    close = difflib.get_close_matches(spec.name, list(valid), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return ModelSpecError(f"model spec {spec.canonical!r}: unknown {spec.zoo} model {spec.name!r}{hint}")


def _bad_args(spec: ModelSpec, exc: Exception) -> ModelSpecError:
    return ModelSpecError(f"model spec {spec.canonical!r}: cannot build with overrides {dict(spec.overrides)}: {exc}")


# --- builders ----------------------------------------------------------------------------------------------


def _image_inputs(size: tuple[int, ...]):
    import torch

    return (torch.randn(1, *size, generator=torch.Generator().manual_seed(0)),)


def _build_torchvision(spec: ModelSpec, tokens: int):
    import torchvision

    names = torchvision.models.list_models()
    if spec.name not in names:
        raise _unknown_name(spec, names)
    try:
        module = torchvision.models.get_model(spec.name, weights=None, **dict(spec.overrides))
    except (TypeError, ValueError) as exc:
        raise _bad_args(spec, exc) from exc
    if spec.name in torchvision.models.list_models(module=torchvision.models.video):
        return module, _image_inputs((3, 16, 112, 112)), "video", {"input_size": [3, 16, 112, 112]}
    side = 299 if spec.name == "inception_v3" else 224
    return module, _image_inputs((3, side, side)), "image", {"input_size": [3, side, side]}


def _build_timm(spec: ModelSpec, tokens: int):
    import timm

    if not timm.is_model(spec.name):
        raise _unknown_name(spec, timm.list_models())
    try:
        module = timm.create_model(spec.name, pretrained=False, **dict(spec.overrides))
    except (TypeError, ValueError, AssertionError) as exc:
        raise _bad_args(spec, exc) from exc
    size = tuple(getattr(module, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    side = dict(spec.overrides).get("img_size")
    if isinstance(side, int):  # the pretrained config keeps the default size; the model takes the override
        size = (dict(spec.overrides).get("in_chans", size[0]), side, side)
    return module, _image_inputs(size), "image", {"input_size": list(size)}


def _build_hf(spec: ModelSpec, tokens: int):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec.name not in CONFIG_MAPPING:
        raise _unknown_name(spec, CONFIG_MAPPING.keys())
    config_class = CONFIG_MAPPING[spec.name]
    defaults = config_class()
    unknown = [k for k, _ in spec.overrides if not hasattr(defaults, k)]
    if unknown:
        valid = sorted(k for k in defaults.to_dict() if not k.startswith("_"))
        close = {k: difflib.get_close_matches(k, valid, n=3) for k in unknown}
        raise ModelSpecError(
            f"model spec {spec.canonical!r}: unknown {spec.name} config keys {unknown}"
            f" (close matches: {close}); valid keys include: {', '.join(valid[:40])}")
    # A config object only: from_pretrained / trust_remote_code are never used, so nothing is fetched or run.
    config = config_class(**dict(spec.overrides))
    try:
        module = _auto_class(config).from_config(config, attn_implementation="eager")
    except (TypeError, ValueError, AttributeError) as exc:
        raise _bad_args(spec, exc) from exc
    return (module, *_hf_inputs(spec, config, tokens))


def _auto_class(config):
    """Decoder-only LMs keep their LM head; encoders (also listed for causal LM, e.g. bert) use the base model."""
    import transformers

    causal = (type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
              and type(config) not in transformers.MODEL_FOR_MASKED_LM_MAPPING)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _hf_inputs(spec: ModelSpec, config, tokens: int):
    import torch

    image_size = getattr(config, "image_size", None)
    if getattr(config, "vocab_size", None) is None and isinstance(image_size, int):
        channels = getattr(config, "num_channels", 3)
        size = (channels, image_size, image_size)
        return _image_inputs(size), "image", {"input_size": list(size)}
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and tokens > limit:
        raise ModelSpecError(f"model spec {spec.canonical!r}: --tokens {tokens} exceeds the model's "
                             f"{limit} positions")
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    return (ids,), "text", {"input_size": [tokens], "vocab_size": config.vocab_size}


def _build_folder(spec: ModelSpec, tokens: int) -> BuiltModel:
    """A local Hugging Face folder: its config, its pretrained weights, its tokenizer when it ships one (local files
    only: nothing is fetched, no remote code runs)."""
    import transformers

    folder = spec.name
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        module = _auto_class(config).from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     attn_implementation="eager")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelSpecError(f"model folder {folder!r} cannot be loaded as a Hugging Face model: "
                             f"{type(exc).__name__}: {exc}") from exc
    tokenizer = None
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                                   trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSpecError(f"model folder {folder!r}: its tokenizer files cannot be read: "
                                 f"{type(exc).__name__}: {exc}") from exc
    module.eval()
    inputs, family, info = _hf_inputs(spec, config, tokens)
    info = {**info, "model_type": config.model_type, "tokenizer": type(tokenizer).__name__ if tokenizer else None}
    return BuiltModel(spec, module, inputs, family, info, tokenizer)


# --- weights -----------------------------------------------------------------------------------------------


def _read_state_dict(path: str) -> dict:
    import torch

    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the file is unusable; keep the cause chained
        raise ModelSpecError(f"weights file {path!r} is corrupt or unreadable: {type(exc).__name__}: "
                             f"{exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"weights file {path!r} does not hold a state dict (name -> tensor); "
                             f"got {type(state).__name__}")
    return state


def _load_weights(module, state: dict, path: str) -> None:
    expected = module.state_dict()
    # Tied parameters (e.g. an LM head sharing the embedding) are saved once; any alias present is enough.
    by_storage: dict[int, set[str]] = {}
    for key, tensor in expected.items():
        by_storage.setdefault(tensor.data_ptr(), set()).add(key)
    missing = [k for k in expected if k not in state and not (by_storage[expected[k].data_ptr()] & state.keys())]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ModelSpecError(
            f"weights file {path!r} does not match the architecture: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} wrong shapes {wrong[:3]}")
    module.load_state_dict(state, strict=False)
