"""One exception hierarchy; the CLI maps each class to an exit code."""


class QuantkitError(Exception):
    """Base class for errors a user can cause or fix. Exit code 2."""

    exit_code = 2


class RecipeError(QuantkitError):
    """The recipe file is missing, malformed or invalid."""


class ModelLoadError(QuantkitError):
    """The model cannot be found or loaded."""


class CalibrationError(QuantkitError):
    """The calibration or evaluation data is missing or too small."""


class SolverError(CalibrationError):
    """A numerical solver failed on the calibration data (e.g. GPTQ's Hessian is not positive
    definite). The message names the knob to turn: raise dampening, or add calibration data."""


class OutputExistsError(QuantkitError):
    """The output path exists and --force was not given."""


class FormatError(QuantkitError):
    """A tensor cannot be quantized in the requested format (shape, dtype)."""


class UnsupportedArchitectureError(QuantkitError):
    """The model's architecture is not one quantkit knows how to walk."""


class QualityGateError(QuantkitError):
    """A CI quality gate (--max-ppl-increase, --max-kl) failed. Exit code 1."""

    exit_code = 1


class CheckpointCheckError(QuantkitError):
    """The checkpoint apply just wrote failed verify's checks: a quantkit bug, nothing was written. Exit 3."""

    exit_code = 3
