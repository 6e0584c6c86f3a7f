"""Exception hierarchy: every ``OnnxoptError`` is a problem the user can fix.

The CLI prints an ``OnnxoptError`` as one line (plus optional detail lines) and
exits 1; anything else escaping is an onnxopt bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxoptError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback and exits 1."""


class ModelLoadError(OnnxoptError):
    """The input is not a loadable ONNX model."""


class ModelSaveError(OnnxoptError):
    """The output could not be written; nothing was left behind."""


class UnknownPassError(OnnxoptError):
    """A pass name that is not in the registry."""


class PassOptionError(OnnxoptError):
    """A bad ``key=value`` option for a pass."""


class MissingRequirementError(OnnxoptError):
    """A pass needs input the user did not supply (calibration data, shapes)."""


class PreconditionError(OnnxoptError):
    """A pass cannot handle this graph at all."""


class PassFailedError(OnnxoptError):
    """A pass raised or produced an invalid graph; the original is kept as ``__cause__``."""


class InputDataError(OnnxoptError):
    """User-supplied or generated input data does not fit the model."""


class ExportError(OnnxoptError):
    """A PyTorch model could not be built, exported, or does not match its export."""


class ValidationError(OnnxoptError):
    """The optimized model's outputs differ from the original's beyond tolerance."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
