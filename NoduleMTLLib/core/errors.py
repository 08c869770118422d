"""The one root of NoduleMTL's errors, and the exit code of each.

Every exception the library raises on purpose derives from :class:`NoduleMTLError`; each
class carries its own ``exit_code``, which ``nodulemtl`` returns when the error stops a
command (:func:`exit_code_for`).  The classes keep their historic homes (``io.InputError``,
``registry.WeightsError``, ...): they are defined here and re-exported there, so both
imports name the same class.  Each also keeps the built-in base it had (``ValueError``,
``RuntimeError``, ``OSError``), so older ``except ValueError`` code still catches it.

Exit codes of ``nodulemtl`` (also in ``docs/errors.md``):

=====  ======================  ==================================================
code   class                   meaning
=====  ======================  ==================================================
0      -                       success
1      NoduleMTLError          any other library error; ``batch``: a case failed
2      UsageError              usage error: argparse, bad ``pacs`` options
2      ProtocolError           a worker request that does not follow the protocol (a usage error)
3      InputError              the input is not something NoduleMTL can analyse
4      NoLungError             whole-scan search: no plausible lung in the CT
5      NotCTError              the input is not a CT (``--allow-non-ct`` overrides)
6      BatchError              batch input list / points file / network list
7      WeightsError            weights or models.json missing, corrupt, unlisted
8      CalibrationError        calibration.json corrupt, unverified or invalid
9      DeviceError             the requested compute device is unavailable
10     OutputError             the output folder cannot be written
11     OutputLocked            another run is writing into the output folder
12     OutputsError            an output folder read back is incomplete
13     DicomSegError           DICOM SEG cannot be written
14     DicomSrError            DICOM SR cannot be written
15     ModelImportError        an imported weights file is refused
16     UnknownNetworkError     a network id that is not registered
17     PacsError               the DICOMweb archive cannot be used (unreachable, login, TLS)
18     StudyError              one archive study cannot be analysed (``pacs``: that study fails)
130    -                       interrupted (Ctrl-C)
=====  ======================  ==================================================

This module imports nothing of the library (any module may import it).
"""

from __future__ import annotations

#: Exit code of an interrupted run (Ctrl-C / SIGINT), the shell convention 128 + 2.
EXIT_INTERRUPTED = 130
#: Exit code of a usage error (argparse).
EXIT_USAGE = 2


class NoduleMTLError(Exception):
    """Root of every NoduleMTL library error; ``exit_code``: what ``nodulemtl`` returns for it."""

    exit_code = 1


class InputError(NoduleMTLError, ValueError):
    """The input is not something NoduleMTL can analyse (message says why)."""

    exit_code = 3


class NoLungError(InputError):
    """No plausible lung in the CT (whole-scan search): not a chest CT, or an extreme field of view."""

    exit_code = 4


class NotCTError(InputError):
    """The input is not a CT (DICOM Modality / SOP class): refused unless ``--allow-non-ct``."""

    exit_code = 5


class UnknownNetworkError(InputError, KeyError):
    """A network id that the registry does not know (also a KeyError, as ``registry.get_spec`` raised before)."""

    exit_code = 16

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BatchError(NoduleMTLError, ValueError):
    """A batch cannot start (bad input list, points file or network list)."""

    exit_code = 6


class WeightsError(NoduleMTLError, RuntimeError):
    """Weights missing, unreadable, failing their checksum, not listed in the manifest, or a bad models.json."""

    exit_code = 7


class CalibrationError(NoduleMTLError, ValueError):
    """calibration.json is malformed, fails its checksum, or a model cannot be applied to a run."""

    exit_code = 8


class DeviceError(NoduleMTLError, RuntimeError):
    """The requested compute device is not available."""

    exit_code = 9


class OutputError(NoduleMTLError, OSError):
    """The output folder cannot be created or written."""

    exit_code = 10


class OutputLocked(OutputError):
    """Another run holds the lock of the output folder."""

    exit_code = 11


class OutputsError(NoduleMTLError, RuntimeError):
    """An output folder is incomplete or its files do not agree (``outputs.read_outputs``)."""

    exit_code = 12


class DicomSegError(NoduleMTLError, RuntimeError):
    """A DICOM SEG cannot be built or written."""

    exit_code = 13


class DicomSrError(NoduleMTLError, RuntimeError):
    """A DICOM SR cannot be built or written."""

    exit_code = 14


class ModelImportError(NoduleMTLError, ValueError):
    """A weights file offered for import is refused."""

    exit_code = 15


class UsageError(NoduleMTLError, ValueError):
    """Bad options that argparse cannot check (credentials in a URL, an unreadable auth file, a bad date):
    a usage error, exit code 2 like argparse's."""

    exit_code = EXIT_USAGE


class ProtocolError(UsageError):
    """A worker request or event line that does not follow the protocol (``NoduleMTLLib.apps.protocol``): a usage error."""

    exit_code = EXIT_USAGE


class PacsError(NoduleMTLError, RuntimeError):
    """The archive cannot be used for this run (unreachable, login refused, TLS failure): stops the run."""

    exit_code = 17


class StudyError(NoduleMTLError, RuntimeError):
    """A problem of one study (not found, no CT, bad series): that study fails or is skipped, the run goes on."""

    exit_code = 18


def _all_classes(cls=NoduleMTLError):
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_classes(sub)


#: The exit codes of the library's error classes that are not usage errors (3 and up; 1 is the root's).
LIBRARY_EXIT_CODES = frozenset(c.exit_code for c in _all_classes() if c is not NoduleMTLError and not issubclass(c, UsageError))


def exit_code_for(error: BaseException) -> int:
    """The exit code of ``nodulemtl`` for ``error``: its class's ``exit_code``
    (:data:`EXIT_INTERRUPTED` for KeyboardInterrupt, 1 for anything else)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return int(getattr(error, "exit_code", 1)) if isinstance(error, NoduleMTLError) else 1


def one_line(error: BaseException) -> str:
    """The error's message on one line (its class name when empty)."""
    return " ".join(str(error).split()) or type(error).__name__
