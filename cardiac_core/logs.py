"""What the launchers print: the project's own lines, not the outside libraries' chatter.

orbax, TFDS and absl log every checkpoint read and dataset open at INFO or WARNING (through
the Python logger "absl"), jax logs "Unable to initialize backend 'tpu'" at INFO (logger
"jax._src.xla_bridge"), and the C++ side of TF/XLA logs through TF_CPP_MIN_LOG_LEVEL. A normal
run should print its progress and its result; `quiet_third_party` keeps those libraries to
their errors unless `--verbosity` asks for more. The project's own loggers (and the root
logger, which the library modules log to) are left as they are.

`os_error_line` turns an OSError into the one line a launcher prints.
"""

from __future__ import annotations

import errno
import logging
import os

# Top-level packages whose records are the project's own: never filtered here.
PROJECT_PACKAGES = frozenset(
    {"cardiac_core", "tavr_jax", "perfusion", "cardiac_web", "experiments", "__main__", "root"}
)
# Loggers that libraries we call are known to use; set to the chosen level directly, so their
# records are not even made (orbax formats large dicts for its INFO lines).
THIRD_PARTY_LOGGERS = (
    "absl",  # orbax, TFDS, etils and absl itself log through absl.logging
    "jax",
    "jaxlib",
    "orbax",
    "tensorflow",
    "tensorflow_datasets",
    "etils",
    "grain",
    "array_record",
    "pydicom",
    "onnxruntime",
    "onnx",
    "matplotlib",
    "PIL",
    "h5py",
    "fsspec",
    "httpx",
    "urllib3",
    "asyncio",
)
_ABSL_TO_STANDARD = {-3: logging.CRITICAL, -2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}


class _ThirdPartyFilter(logging.Filter):
    """On the root handlers: drops records below `level` from loggers outside the project
    (the loggers of libraries not named in THIRD_PARTY_LOGGERS reach the handlers too)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        return record.name.split(".", 1)[0] in PROJECT_PACKAGES


def third_party_level(verbosity=None) -> int:
    """The Python logging level for outside libraries.

    `verbosity`: None (quiet: errors only), an int on absl's scale (-3 fatal .. 0 info,
    1 and above debug), or absl's `FLAGS["verbosity"]` flag (quiet unless it was given on
    the command line, since absl's default of 0 would mean INFO).
    """
    if verbosity is not None and hasattr(verbosity, "present"):
        verbosity = verbosity.value if verbosity.present else None
    if verbosity is None:
        return logging.ERROR
    verbosity = int(verbosity)
    return logging.DEBUG if verbosity > 0 else _ABSL_TO_STANDARD.get(verbosity, logging.CRITICAL)


def quiet_third_party(verbosity=None) -> int:
    """Keeps outside libraries to their errors unless `verbosity` asks for more.

    Call it first thing in a launcher's main (after absl parsed the flags: parsing
    --verbosity resets absl's levels). Sets the known libraries' loggers to the level, adds a
    filter to the root handlers for the others, and sets TF_CPP_MIN_LOG_LEVEL for the C++
    logs (unless the environment already sets it). Returns the level. Idempotent.
    """
    level = third_party_level(verbosity)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    if not root.handlers:  # outside absl's app.run: warnings and errors still reach stderr
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, _ThirdPartyFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_ThirdPartyFilter(level))
    # TF/XLA C++: 0 everything, 1 no INFO, 2 no WARNING, 3 no ERROR. It is read when the C++
    # side first logs, which is after main starts (backend initialisation).
    cpp = {logging.DEBUG: "0", logging.INFO: "0", logging.WARNING: "1"}.get(level, "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", cpp)
    return level


class _DropTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def drop_tracebacks(logger_name: str) -> None:
    """Drops the records carrying a traceback that `logger_name` logs (idempotent).

    For libraries that log an exception's traceback and then raise it (or one naming it):
    the caller turns the raised error into its own one line, so the logged copy is noise.
    """
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropTracebacks) for f in logger.filters):
        logger.addFilter(_DropTracebacks())


# errno -> the cause as a launcher says it (strerror's wording otherwise).
_CAUSES = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists",
}


def os_error_cause(e: OSError) -> str:
    """The cause of a failed file operation as a launcher says it: "disk full", ..."""
    return _CAUSES.get(e.errno) or e.strerror or type(e).__name__


def os_error_line(e: OSError, path=None) -> str:
    """One line naming the path and the cause: "PATH: disk full (No space left on device)".

    `path` is used when the error carries none (a failed write or flush names no file).
    """
    if e.errno is None:  # raised with our own message, e.g. FileNotFoundError("no such ...")
        return " ".join(str(e).split()) or type(e).__name__
    where = e.filename if e.filename is not None else path
    cause = _CAUSES.get(e.errno)
    if cause is None:
        text = e.strerror or str(e)
    elif e.strerror and e.strerror.lower() != cause:
        text = f"{cause} ({e.strerror})"
    else:
        text = cause
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    text = " ".join(str(text).split())
    return f"{where}: {text}" if where is not None else text
