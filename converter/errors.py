"""One exception tree. Every message names the file, tensor or layer, what was found, and the
fix."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The CLI's exit codes, for CI gating and scripts."""

    OK = 0
    FINDINGS = 1  # verify: a real mismatch; audit: findings at or above --fail-on
    ERROR = 2  # bad input or a step that could not run: one line on stderr naming file/tensor/layer
    INTERNAL = 70  # a bug in ckptport (EX_SOFTWARE): one line, the traceback with -v
    INTERRUPTED = 130  # Ctrl-C (SIGTERM/SIGHUP exit 128 + signal number)


class ConverterError(Exception):
    """Base of every error ckptport raises on purpose. The CLI prints ``str(err)`` on one line, exit
    2."""

    exit_code = ExitCode.ERROR


class SourceFormatError(ConverterError):
    """The input file is missing, empty, truncated, corrupt or of an unknown format."""


class UnknownArchitectureError(ConverterError):
    """No mapping table matches the source layers (or the named one does not fit them)."""


class MappingError(ConverterError):
    """A mapping table is malformed, or a conversion leaves tensors unmapped or targets unfilled."""


class AmbiguousMappingError(MappingError):
    """A drafted mapping where the structure leaves a choice: the message lists the candidates."""


class ShapeMismatchError(MappingError):
    """A tensor's shape after its transform differs from what the target expects."""


class UnsupportedLayerError(ConverterError):
    """The source uses a feature PyTorch has no twin for (BatchNormalization renorm, ...)."""


class InvalidTensorError(ConverterError):
    """A tensor holds NaN/inf or impossible values (negative variance)."""


class OutputExistsError(ConverterError):
    """The output path exists and ``force`` was not given."""


class RegistryError(ConverterError, KeyError):
    """A registry lookup missed or a name was registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FrameworkMissingError(ConverterError):
    """An optional framework (torch, timm, tensorflow) is needed for this step but not installed."""


class VerificationError(ConverterError):
    """Verification could not run (not: it ran and found a mismatch)."""


# An option as the library's messages name it (its API keyword) -> the CLI flag the CLI shows in
# its place (cli_message): one name per message, right for whoever reads it.
OPTIONS = {
    "force=True": "--force",
    "accept_folded_bn=True": "--accept-folded-bn",
}


def option(keyword: str) -> str:
    """How a message names an option: its API keyword (``force=True``), which the CLI shows as the
    flag (``--force``); a keyword not in ``OPTIONS`` is a bug."""
    if keyword not in OPTIONS:
        raise KeyError(f"{keyword!r} is not in converter.errors.OPTIONS: {', '.join(OPTIONS)}")
    return keyword


def cli_message(err: BaseException) -> str:
    """The message as the CLI prints it: every option keyword replaced by its flag."""
    text = str(err)
    for keyword, flag in OPTIONS.items():
        text = text.replace(keyword, flag)
    return text
