"""Exception types raised by einfx.

Every einfx error derives from :class:`EinfxError`; the concrete classes also derive from the closest
built-in type so that callers catching ``ValueError`` or ``RuntimeError`` keep working. Messages name the
layer, node or file involved, the offending values and the valid options.
"""

__all__ = [
    "EinfxError",
    "StructureError",
    "ShapeError",
    "WeightError",
    "ProjectionError",
    "PolicyError",
    "TraceError",
    "PlanError",
    "ProfileError",
    "ExportError",
    "TuningCacheError",
    "ModelSpecError",
    "PassError",
    "SavedModelError",
    "UnmatchedPatternWarning",
]


class EinfxError(Exception):
    """Base class of every error einfx raises on purpose."""


class StructureError(EinfxError, ValueError):
    """Unknown structure name, invalid θ, or invalid structure arguments (rank, experts, k)."""


class ShapeError(EinfxError, ValueError):
    """Sizes that a structure cannot take (padding over tolerance, rank above the maximum, bad input)."""


class WeightError(EinfxError, ValueError):
    """A weight that cannot be used: NaN/Inf entries, wrong number of dimensions, wrong shape."""


class ProjectionError(EinfxError, RuntimeError):
    """Projection of a dense weight onto a structure failed."""


class PolicyError(EinfxError, ValueError):
    """A policy (dict, YAML or TOML) with unknown keys, bad values or unknown structure names."""


class TraceError(EinfxError, RuntimeError):
    """No tracing front end could capture the model; ``reasons`` maps each front end to its failure."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None):
        super().__init__(message)
        self.reasons = dict(reasons or {})


class PlanError(EinfxError, ValueError):
    """A contraction plan that cannot be built or applied."""


class ProfileError(EinfxError, ValueError):
    """A device profile file that is missing, corrupt, of another version or for another device."""


class ExportError(EinfxError, RuntimeError):
    """ONNX export or verification failed."""


class TuningCacheError(ExportError):
    """A tuning cache that cannot be trusted here: unreadable, another format, or measured elsewhere."""


class ModelSpecError(EinfxError, ValueError):
    """A model spec (``zoo:NAME``, ``hf:NAME?k=v`` or a weights file) that cannot be parsed, built or loaded."""


class PassError(EinfxError, RuntimeError):
    """A graph pass raised or left an invalid graph; the message names the pass, ``__cause__`` keeps the error."""


class SavedModelError(EinfxError, ValueError):
    """A saved model folder is missing, corrupt or does not match its base model (the message names the file)."""


class UnmatchedPatternWarning(UserWarning):
    """A policy rule or exclude pattern matched no layer of the model (likely a typo): the message names the
    pattern and the closest layer names. Turn it into an error with ``warnings.simplefilter("error",
    UnmatchedPatternWarning)``."""
