"""Training that survives an interruption: the fit loop of ``model.build``,
checkpointed every few minutes so a stopped build goes on where it was.

The teacher's full run (``python -m model teacher``) trains for over an hour
on this project's 2-core machine; twice it was lost to a restart or to the
machine being needed for something else, because a build was cached only
once finished. Keras' own ``BackupAndRestore`` restarts an interrupted epoch
from its first batch (its checkpoint records the batch but does not skip
to it), and an epoch here is 40 minutes, so this loop feeds ``fit`` a slice
of the epoch's batches at a time and saves, between slices, the model with
its optimizer (``save_weights`` writes both: the step count, hence the
learning-rate schedule, and Adam's moments), the position, and the best
epoch so far with its weights. The batches are the same on a rerun: the
build derives them from its seeded random generator.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_LOG = logging.getLogger(__name__)

# A slice of an epoch between two chances to save (about 100 s of teacher
# training); a save happens at the first chance after EVERY_S.
SLICE_BATCHES = 50
EVERY_S = 600.0


class Checkpoint:
    """The training state of one build in ``directory``.

    ``fingerprint`` identifies the run (batches per epoch, epochs, rows): a
    checkpoint of another run is set aside, never resumed.
    """

    def __init__(self, directory: Path, fingerprint: dict, every_s: float = EVERY_S):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every_s = every_s
        self._last = time.monotonic()
        self._best_epoch_saved = None

    @property
    def _meta(self) -> Path:
        return self.directory / "position.json"

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, model, epoch: int, batch: int, best: tuple) -> None:
        """Saves the state before batch ``batch`` of epoch ``epoch``;
        ``best`` is ``(macro_f1, weights, epoch)``."""
        started = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / "partial.weights.h5"
        model.save_weights(str(partial))
        os.replace(partial, self.directory / "latest.weights.h5")
        if best[1] is not None and best[2] != self._best_epoch_saved:
            with open(self.directory / "best.partial.npz", "wb") as f:
                np.savez(f, *best[1])
            os.replace(self.directory / "best.partial.npz", self.directory / "best.npz")
            self._best_epoch_saved = best[2]
        position = {"fingerprint": self.fingerprint, "epoch": epoch, "batch": batch,
                    "best_macro_f1": best[0], "best_epoch": best[2],
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self._meta.with_suffix(".partial")
        tmp.write_text(json.dumps(position, indent=2) + "\n")
        os.replace(tmp, self._meta)
        self._last = time.monotonic()
        _LOG.info("training checkpoint saved in %.1fs: epoch %d, batch %d (%s)",
                  self._last - started, epoch, batch, self.directory)

    def restore(self, model) -> tuple[int, int, tuple] | None:
        """Loads a saved state into ``model`` (compiled, built); returns
        ``(epoch, batch, best)``, or None when there is nothing to resume."""
        if not self._meta.exists():
            return None
        position = json.loads(self._meta.read_text())
        if position.get("fingerprint") != self.fingerprint:
            _LOG.warning("training checkpoint in %s is of another run (%s, this one %s): "
                         "starting over", self.directory, position.get("fingerprint"),
                         self.fingerprint)
            self.discard()
            return None
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(str(self.directory / "latest.weights.h5"))
        best: tuple = (-1.0, None, 0)
        if position["best_epoch"]:
            with np.load(self.directory / "best.npz") as npz:
                best = (position["best_macro_f1"],
                        [npz[f"arr_{i}"] for i in range(len(npz.files))],
                        position["best_epoch"])
            self._best_epoch_saved = position["best_epoch"]
        _LOG.info("resuming training from the checkpoint of %s: epoch %d, batch %d "
                  "(best epoch so far: %s)", position["saved_at"], position["epoch"],
                  position["batch"], position["best_epoch"] or "none yet")
        self._last = time.monotonic()
        return position["epoch"], position["batch"], best

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def fit_epochs(model, batches: list, epochs: int, dataset_of: Callable[[list], object],
               validate: Callable[[int], float], callbacks: list,
               checkpoint: Checkpoint | None = None) -> tuple[float, list, int]:
    """Trains ``model`` for ``epochs`` passes over ``batches`` (the same order
    each pass; ``dataset_of(some_batches)`` makes a ``tf.data.Dataset`` of
    them), scoring each epoch with ``validate(epoch)`` (higher is better);
    leaves the best epoch's weights in the model and returns ``(score,
    weights, epoch)`` of it. With ``checkpoint``, resumes from it and saves
    into it as it goes (``Checkpoint``).
    """
    import tensorflow as tf

    epoch, batch, best = 1, 0, (-1.0, None, 0)
    if checkpoint is not None:
        epoch, batch, best = checkpoint.restore(model) or (epoch, batch, best)
    for callback in callbacks:
        # A resumed run's progress counts the batches already done.
        if hasattr(callback, "skip"):
            callback.skip((epoch - 1) * len(batches) + batch)
    while epoch <= epochs:
        while batch < len(batches):
            end = min(batch + SLICE_BATCHES, len(batches))
            # The dataset's length is given: without it Keras counts one more
            # optimizer step per fit() (its end-of-data probe) and warns.
            part = dataset_of(batches[batch:end]).apply(
                tf.data.experimental.assert_cardinality(end - batch))
            model.fit(part, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
            batch = end
            if checkpoint is not None and batch < len(batches) and checkpoint.due():
                checkpoint.save(model, epoch, batch, best)
        score = validate(epoch)
        if score > best[0]:
            best = (score, model.get_weights(), epoch)
        epoch, batch = epoch + 1, 0
        if checkpoint is not None and (epoch <= epochs or checkpoint.due()):
            # Also after the last epoch when it was long: a rerun then skips
            # straight to scoring and export.
            checkpoint.save(model, epoch, 0, best)
    model.set_weights(best[1])
    return best
