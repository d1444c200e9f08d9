"""Quiet by default: every command's logging set-up, and TensorFlow's start-up
lines kept off the terminal.

TensorFlow's native code writes to the process's stderr (file descriptor 2) as
it loads and first runs: ``I0000 ... oneDNN custom operations are on``,
``Could not find cuda drivers``, ``E0000 ... failed call to cuInit`` (there is no
GPU), ``oneDNN supports DT_INT64 only ...`` and absl's ``WARNING: All log
messages before absl::InitializeLog()``. They look like faults and are not;
``TF_CPP_MIN_LOG_LEVEL`` no longer silences them (absl logging). So
``quiet_tensorflow`` imports TensorFlow, initializes its devices and runs the op
that logs the int64 line (once per process), with file descriptor 2 captured,
and passes on every captured line except those known ones: a real error still
shows. ``--log_level debug`` or ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile

_BENIGN_NATIVE = re.compile("|".join([
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"port\.cc:\d+\] oneDNN custom operations are on\.",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"cuda_platform\.cc:\d+\] failed call to cuInit",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow",
    r"util\.cc:\d+\] oneDNN supports DT_INT64 only on platforms with AVX-512",
    r"generator_dataset_op\.cc:\d+\] Memory patch applied: M_TRIM_THRESHOLD",
]))
# Beam 2.77 logs this at each RunInference set-up when PyTorch is absent (its
# import of `resource` sits in the same try block as a torch-only module).
_BENIGN_LOGS = ("Resource module is not available for current platform",)
# Logged at WARNING or ERROR, and routine: shown at INFO. Beam's subprocess
# server announces every service it starts and stops (Prism's job service);
# Prism calls the reshuffle placeholder of beam.Create an empty transform, and
# names the bundle a cancel ends a failed one.
_ROUTINE_LOGS = ("Really starting service at", "Really destroying service at",
                 "empty transform, with payload and identical input and output",
                 "error='pipeline canceled'")
_done = False


def verbose() -> bool:
    """Whether the user asked for everything (``--log_level debug``)."""
    return (os.environ.get("BERTSTREAM_LOG_LEVEL", "").lower() == "debug"
            or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0")


@contextlib.contextmanager
def native_stderr_filtered():
    """Captures file descriptor 2 (native code's stderr, Python's too) for the
    block, then writes back every line that is not a known start-up line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines()
                    if not _BENIGN_NATIVE.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def quiet_tensorflow() -> None:
    """Imports TensorFlow and tensorflow-text, quietly (module doc). Call it
    before anything imports TensorFlow; later imports are then free."""
    global _done
    if _done:
        return
    _done = True
    if verbose():
        return
    with native_stderr_filtered():
        import tensorflow as tf
        import tensorflow_text  # noqa: F401 - the model's ops

        tf.config.list_physical_devices()  # the CUDA probe
        tf.function(lambda: tf.transpose(tf.zeros((1, 1), tf.int64)))()  # the int64 line


def quiet_generator_datasets() -> None:
    """The first iteration of a ``tf.data.Dataset.from_generator`` in a
    process logs ``I0000 ... Memory patch applied: M_TRIM_THRESHOLD=128 kb``
    (tf.data sets malloc's trim threshold, once). Training calls this before
    its first epoch so the line is made here, where it is filtered, and not in
    the middle of the build's progress."""
    quiet_tensorflow()
    if verbose():
        return
    import tensorflow as tf

    with native_stderr_filtered():
        dataset = tf.data.Dataset.from_generator(
            lambda: iter([0]), output_signature=tf.TensorSpec([], tf.int32))
        for _ in dataset:
            pass


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if any(text in message for text in _BENIGN_LOGS):
            return False
        if record.levelno >= logging.WARNING and any(t in message for t in _ROUTINE_LOGS):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging(level: str = "info") -> None:
    """Logging for a command: ``level`` for the project's loggers, WARNING for
    the libraries' (their INFO lines are start-up chatter), debug for all."""
    level = (level or "info").lower()
    if level == "debug":
        os.environ["BERTSTREAM_LOG_LEVEL"] = "debug"  # worker processes inherit it
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":
        for noisy in ("apache_beam", "absl", "tensorflow", "urllib3", "keras", "h5py"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropBenign())


def log_level_from(argv: list[str]) -> str:
    """``--log_level`` from a command line, before its own parser runs."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--log_level=", "--log-level=")):
            return arg.split("=", 1)[1]
        if arg in ("--log_level", "--log-level") and i + 1 < len(argv):
            return argv[i + 1]
    return os.environ.get("BERTSTREAM_LOG_LEVEL", "info")
