"""Distillation (model/student.py): the loss, the soft-label checks, and a tiny
teacher's trial soft labels feeding a tiny student build end to end.

The real teacher takes hours (``python -m model teacher``); here a tiny
random-init MPNet teacher labels a few hundred texts through the same
command, and a tiny MiniLM student is built from that file with the same
code the default build runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertstream.config import cache_dir
from model import data, student
from model.build import BuildConfig

ROOT = Path(__file__).resolve().parent.parent
CACHE = cache_dir()


def _numpy_loss(targets: np.ndarray, logits: np.ndarray, a: float, t: float) -> np.ndarray:
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    gold = targets[:, student.GOLD].astype(int)
    has_teacher = targets[:, student.HAS_TEACHER] > 0.5
    teacher = log_softmax(targets[:, student.LOGITS] / t)
    soft = (np.exp(teacher) * (teacher - log_softmax(logits / t))).sum(axis=1) * t * t
    hard = -log_softmax(logits)[np.arange(len(gold)), np.maximum(gold, 0)]
    both = a * soft + (1 - a) * hard
    return np.where((gold >= 0) & has_teacher, both, np.where(has_teacher, soft, hard))


def test_the_loss_weighs_each_kind_of_row_as_documented():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    rows = [data.Row("labelled, teacher too", 2), data.Row("unlabelled", student.UNLABELLED),
            data.Row("labelled, no teacher", 0)]

    class Teacher:
        def lookup(self, texts):
            table = {"labelled, teacher too": [0.1, -0.5, 0.4], "unlabelled": [2.0, 0.0, -2.0]}
            return np.array([table.get(t, [np.nan] * 3) for t in texts], np.float32)

    targets = student.targets(rows, Teacher())
    assert targets[:, student.GOLD].tolist() == [2, student.UNLABELLED, 0]
    assert targets[:, student.HAS_TEACHER].tolist() == [1, 1, 0]
    logits = np.array([[0.3, 0.1, -0.2], [-1.0, 0.5, 0.2], [0.0, 1.0, 0.0]], np.float32)
    got = student.distillation_loss(0.7, 2.0)(targets, logits).numpy()
    np.testing.assert_allclose(got, _numpy_loss(targets, logits, 0.7, 2.0), rtol=1e-5)
    # a = 0 on a labelled row is the plain cross-entropy; a = 1 the KL term alone.
    hard_only = student.distillation_loss(0.0, 2.0)(targets[:1], logits[:1]).numpy()
    soft_only = student.distillation_loss(1.0, 2.0)(targets[:1], logits[:1]).numpy()
    probabilities = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert hard_only[0] == pytest.approx(-np.log(probabilities[2]), rel=1e-5)
    assert soft_only[0] == pytest.approx(_numpy_loss(targets[:1], logits[:1], 1.0, 2.0)[0],
                                         rel=1e-5)
    assert soft_only[0] != pytest.approx(hard_only[0])


def test_missing_or_altered_soft_labels_stop_the_build_naming_the_fix(tmp_path):
    missing = tmp_path / "soft.npz"
    with pytest.raises(FileNotFoundError, match="python -m model teacher.*--no-distill"):
        student.check_soft_labels(missing)
    np.savez(missing, keys=np.array([1], np.uint64))
    (tmp_path / "soft.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ValueError, match="regenerate both"):
        student.check_soft_labels(missing)
    # The build refuses it before training, naming the flag's file.
    with pytest.raises(ValueError, match="sha256"):
        BuildConfig.tiny_defaults(out=tmp_path / "out", soft_labels=missing).validate()


def test_builds_without_distillation_keep_their_cache_keys(tmp_path):
    plain = BuildConfig.tiny_defaults(out=tmp_path / "a")
    assert not plain.distilling and plain.soft_labels is None
    weights = BuildConfig.tiny_defaults(out=tmp_path / "a", kd_weight=0.1)
    assert weights.cache_key() == plain.cache_key()  # the loss is unused without a file
    everyday = BuildConfig.tiny_defaults(out=tmp_path / "a", stream_rows=5)
    assert everyday.cache_key() == plain.cache_key()  # so are the everyday tweets


def test_an_ensemble_of_teachers_is_the_mean_of_their_soft_labels(tmp_path):
    from model import teacher

    cfg = BuildConfig.tiny_defaults(out=tmp_path / "out", cache_dir=CACHE)
    texts = {name: ts[:40] for name, ts in
             teacher.distillation_texts(cfg, stream_sample=False).items()}
    rng = np.random.default_rng(0)
    members = []
    for i, drop in enumerate((0, 5)):  # the second teacher labelled 5 texts fewer
        labelled = {name: ts[drop:] for name, ts in texts.items()}
        n = sum(len(ts) for ts in labelled.values())
        logits = rng.normal(size=(n, 3)).astype(np.float32)
        logits -= logits.mean(axis=1, keepdims=True)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        path = tmp_path / f"member{i}.npz"
        teacher.write(path, labelled, probabilities, logits, {"build_key": f"t{i}"},
                      {"trial": False})
        members.append(path)
    out = teacher.average(cfg, members, tmp_path / "ensemble.npz")

    provenance = student.check_soft_labels(out)
    both = {name: ts[5:] for name, ts in texts.items()}
    assert provenance["rows"] == sum(len(ts) for ts in both.values())
    assert provenance["rows_by_source"] == {name: len(ts) for name, ts in both.items()}
    assert [m["build_key"] for m in provenance["teacher"]["members"]] == ["t0", "t1"]
    flat = [t for ts in both.values() for t in ts]
    expected = np.mean([teacher.SoftLabels(m, "logits").lookup(flat) for m in members], axis=0)
    got = teacher.SoftLabels(out, "logits").lookup(flat)
    np.testing.assert_allclose(got, expected, atol=2e-3)  # stored as float16
    assert np.isnan(teacher.SoftLabels(out).lookup([texts[data.TWEETS.name][0]])).all()
    # A student's card names every member.
    section = student.card_section(BuildConfig.tiny_defaults(out=cfg.out, soft_labels=out),
                                   provenance, [], np.zeros((0, student.TARGET_WIDTH)), {})
    assert section["teacher"]["build_key"] == "t0+t1"
    assert [m["soft_labels_sha256"] for m in section["teacher"]["members"]] == [
        data.sha256_of(m) for m in members]
    # One member is no ensemble, and an altered member is refused.
    with pytest.raises(ValueError, match="two soft-label files"):
        teacher.average(cfg, members[:1], tmp_path / "one.npz")
    with pytest.raises(FileNotFoundError, match="--average .*absent.npz: no such file"):
        teacher.average(cfg, [members[0], tmp_path / "absent.npz"], tmp_path / "none.npz")
    members[1].write_bytes(members[0].read_bytes())
    with pytest.raises(ValueError, match="regenerate both"):
        teacher.average(cfg, members, tmp_path / "altered.npz")


@pytest.mark.timeout(900)
def test_a_trial_teacher_labels_texts_and_a_student_is_built_from_them(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("wheels", "encoders"):  # the downloads, not the builds
        # Made first: a link to a directory not there yet (a fresh machine's
        # cache) makes the build's mkdir fail with FileExistsError.
        (CACHE / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(CACHE / shared, target_is_directory=True)
    soft = tmp_path / "soft.npz"
    env = {**os.environ, "BERTSTREAM_CACHE": str(cache)}
    common = ["--tiny", "--max-train-rows", "96", "--max-eval-rows", "48",
              "--precision", "float32", "--cache-dir", str(cache)]
    made = subprocess.run(
        [sys.executable, "-m", "model", "teacher", *common, "--out", str(tmp_path / "teacher"),
         "--soft-labels", str(soft), "--max-texts", "400"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert made.returncode == 0, made.stderr[-3000:]
    provenance = json.loads(soft.with_suffix(".json").read_text())
    assert provenance["trial"] is True and provenance["rows"] == 400
    assert provenance["sha256"] == data.sha256_of(soft)

    assert provenance["rows_by_source"][data.STREAM_SAMPLE.name] > 0

    built = subprocess.run(
        [sys.executable, "-m", "model", "build", *common, "--out", str(tmp_path / "student"),
         "--soft-labels", str(soft), "--stream-rows", "1000"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "distilling from" in built.stderr
    (version,) = (tmp_path / "student").iterdir()
    card = json.loads((version / "model_card.json").read_text())
    distilled = card["distillation"]
    assert distilled["soft_labels"]["sha256"] == provenance["sha256"]
    assert distilled["teacher"]["build_key"] == provenance["teacher"]["build_key"]
    assert (distilled["weight_a"], distilled["temperature"]) == (0.7, 2.0)
    rows = distilled["rows"]
    assert rows["labelled"] == card["data"]["train_rows"] and rows["unlabelled"] > 0
    # Only tweets the (trial) teacher labelled join; labelled rows it did not
    # label train on their gold label alone.
    assert 0 < rows["unlabelled"] <= rows["with_soft_label"] <= provenance["rows"]
    assert rows["labelled_without_soft_label"] == (
        rows["labelled"] - (rows["with_soft_label"] - rows["unlabelled"]))
    assert card["data"]["unlabelled_train_rows"] == rows["unlabelled"]
    # The everyday tweets join as far as the trial teacher labelled them.
    everyday = distilled["rows_by_source"][data.STREAM_SAMPLE.name]
    assert 0 < everyday <= provenance["rows_by_source"][data.STREAM_SAMPLE.name]
    assert rows["unlabelled"] == everyday + distilled["rows_by_source"][data.OOD_TWEETS.name]
    assert data.STREAM_SAMPLE.name in {s["package"] for s in card["data"]["sources"]}
    # A distilled build is a build of its own (its key names the file's hash).
    keyed = BuildConfig.tiny_defaults(out=tmp_path / "x", soft_labels=soft)
    assert keyed.cache_key() != BuildConfig.tiny_defaults(out=tmp_path / "x").cache_key()
    assert BuildConfig.tiny_defaults(out=tmp_path / "x", soft_labels=soft,
                                     stream_rows=10).cache_key() != keyed.cache_key()
