"""A build's training resumes where it was stopped (model/resume.py): on a
small Keras model, a run interrupted mid-epoch and resumed ends with the same
weights, optimizer step and best epoch as a run never interrupted."""

import numpy as np
import pytest

from model import resume

pytestmark = pytest.mark.slow


class Interrupted(Exception):
    pass


def _setup(seed=0):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 40, warmup_target=0.01,
                                                      warmup_steps=4)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(4, 8)).astype(np.float32),
                rng.integers(0, 3, size=4).astype(np.int32)) for _ in range(10)]
    val_x = rng.normal(size=(32, 8)).astype(np.float32)
    val_y = rng.integers(0, 3, size=32)
    spec = (tf.TensorSpec([None, 8], tf.float32), tf.TensorSpec([None], tf.int32))

    def dataset_of(part):
        return tf.data.Dataset.from_generator(lambda: iter(part), output_signature=spec)

    def validate(epoch):
        logits = model(val_x, training=False).numpy()
        return float((logits.argmax(1) == val_y).mean()) + 1e-3 * epoch * (epoch % 2)

    return model, batches, dataset_of, validate


def _stop_after(steps):
    import keras

    class Stop(keras.callbacks.Callback):
        seen = 0

        def on_train_batch_end(self, batch, logs=None):
            Stop.seen += 1
            if Stop.seen == steps:
                raise Interrupted()

    return Stop()


def test_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setattr(resume, "SLICE_BATCHES", 3)
    model, batches, dataset_of, validate = _setup()
    reference = resume.fit_epochs(model, batches, 3, dataset_of, validate, [])
    reference_weights = [w.copy() for w in model.get_weights()]
    reference_step = int(model.optimizer.iterations.numpy())
    assert reference_step == 30

    fingerprint = {"batches_per_epoch": 10, "epochs": 3}
    model, batches, dataset_of, validate = _setup()
    # Saves at every chance; stopped in epoch 2, batch 7 (17 steps in all).
    with pytest.raises(Interrupted):
        resume.fit_epochs(model, batches, 3, dataset_of, validate, [_stop_after(17)],
                          resume.Checkpoint(tmp_path / "ckpt", fingerprint, every_s=0))
    position = (tmp_path / "ckpt" / "position.json").read_text()
    assert '"epoch": 2' in position and '"batch": 6' in position

    # A fresh process: a newly initialised model, the same batches.
    model, batches, dataset_of, validate = _setup(seed=99)
    resumed = resume.fit_epochs(model, batches, 3, dataset_of, validate, [],
                                resume.Checkpoint(tmp_path / "ckpt", fingerprint, every_s=0))
    assert int(model.optimizer.iterations.numpy()) == reference_step
    assert resumed[0] == reference[0] and resumed[2] == reference[2]
    for got, want in zip(model.get_weights(), reference_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    model, batches, dataset_of, validate = _setup()
    checkpoint = resume.Checkpoint(tmp_path / "ckpt", {"batches_per_epoch": 10}, every_s=0)
    checkpoint.save(model, 2, 4, (0.5, model.get_weights(), 1))
    other = resume.Checkpoint(tmp_path / "ckpt", {"batches_per_epoch": 11})
    assert other.restore(model) is None
    assert not (tmp_path / "ckpt").exists()
    assert resume.Checkpoint(tmp_path / "none", {}).restore(model) is None
