"""Shadow rollout: a new model version scores live tweets beside the serving
one, unpublished, and serves only once the gates pass (transforms/rollout.py).

The streaming test runs the job on the emulator with the default model as
version 1: a version 2 that is the tiny random model stays in shadow and is
rejected (it agrees with version 1 on about a third of the sample) while
version 1 keeps serving; a version 3 that is a copy of version 1 is promoted
and later results carry it; every tweet has exactly one result throughout.
The tests of ``ModelSlot`` alone cover a restart (the worker serves the
version Redis says served, and shadows the newer one), a rejected version not
tried again until its files change, the gates, and ``immediate``.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from model.serving import resolve
from tests.streams import ROOT, publish, sample_messages, wait_for

pytestmark = [pytest.mark.integration]

DEFAULT_MODEL = ROOT / "models" / "bert_sentiment"


@pytest.fixture(scope="session")
def default_version() -> Path:
    """The default model's version directory (`make test` builds it first)."""
    try:
        return Path(resolve(DEFAULT_MODEL))
    except FileNotFoundError:
        pytest.fail(f"no default model under {DEFAULT_MODEL}: run `make model` (make test does)")


def _install(version_dir: Path, base: Path, version: int) -> Path:
    """Copies a version in as a deployment should: under a temporary name, then renamed."""
    staging = base / f".{version}.incoming"
    shutil.copytree(version_dir, staging)
    staging.rename(base / str(version))
    return base / str(version)


def _texts(n: int, offset: int = 0) -> list[bytes]:
    return [json.loads(data)["text"].encode() for data, _ in sample_messages(n, offset)]


def _rollout(redis_url: str, **gates):
    from bertstream.config import RedisConfig
    from transforms.rollout import Rollout

    return Rollout(redis=RedisConfig(url=redis_url), **gates)


def _model_hash(client, version: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(f"sentiment:model:{version}").items()}


def _serve(slot, texts: list[bytes]) -> str:
    """What the handler does with a batch: the serving version scores it, the
    shadow version scores it beside; returns the version that served."""
    loaded = slot.current()
    served = np.asarray(loaded.tfx._run_inference(texts, texts, loaded.session)["probabilities"])
    slot.score_in_shadow(texts, served)
    return loaded.version


@pytest.mark.timeout(300)
def test_a_restarted_worker_serves_the_recorded_version_and_promotes_the_newer_in_shadow(
        redis_url, tiny_model_dir, tmp_path, caplog):
    import redis

    from transforms.inference import ModelSlot

    caplog.set_level(logging.INFO, logger="transforms.inference")
    client = redis.Redis.from_url(redis_url)
    base = tmp_path / "models"
    base.mkdir()
    _install(Path(resolve(tiny_model_dir)), base, 1)
    rollout = _rollout(redis_url, tweets=40)
    first = ModelSlot(str(base), "serving_default", 0, rollout)
    assert first.current().version == "1"
    assert _model_hash(client, "1")["state"] == "serving"

    # Version 2 arrives while the job is down: the restarted worker still serves 1.
    _install(Path(resolve(tiny_model_dir)), base, 2)
    slot = ModelSlot(str(base), "serving_default", 0.2, rollout)
    assert slot.current().version == "1"
    wait_for(slot.shadow, 60, "version 2 in shadow")
    assert _model_hash(client, "2")["state"] == "shadow"
    served = [_serve(slot, _texts(16, offset)) for offset in (0, 16)]
    assert served == ["1", "1"]  # 32 counted, 40 needed: still in shadow
    state = _model_hash(client, "2")
    assert (state["state"], state["scored"], state["agreed"]) == ("shadow", "32", "32")
    assert _serve(slot, _texts(16, 32)) == "1"  # the batch that reaches 40 is still 1's
    assert slot.current().version == "2" and slot.shadow() is None
    assert _serve(slot, _texts(4, 48)) == "2"
    state = _model_hash(client, "2")
    assert state["state"] == "promoted" and state["decision"] == "promote"
    assert "agreed on 100.0% of 48 tweets" in state["reason"]
    assert _model_hash(client, "1")["state"] == "retired"
    assert any("version 2 now serving (was 1)" in r.message for r in caplog.records)


@pytest.mark.timeout(300)
def test_a_rejected_version_is_not_tried_again_until_its_files_change(
        redis_url, tiny_model_dir, default_version, tmp_path, caplog):
    import redis

    from transforms.inference import ModelSlot

    caplog.set_level(logging.INFO, logger="transforms.inference")
    client = redis.Redis.from_url(redis_url)
    base = tmp_path / "models"
    base.mkdir()
    _install(Path(resolve(tiny_model_dir)), base, 1)
    rollout = _rollout(redis_url, tweets=50)
    slot = ModelSlot(str(base), "serving_default", 0.2, rollout)
    v2 = _install(default_version, base, 2)  # a real model: it disagrees with the random one
    wait_for(slot.shadow, 60, "version 2 in shadow")
    for offset in range(0, 64, 16):
        assert _serve(slot, _texts(16, offset)) == "1"
    assert slot.shadow() is None and slot.current().version == "1"
    state = _model_hash(client, "2")
    assert state["state"] == "rejected" and state["decision"] == "reject"
    agreed = int(state["agreed"]) / int(state["scored"])
    assert agreed < 0.7 and f"{agreed:.1%}" in state["reason"]
    assert "at least 70% needed" in state["reason"]
    assert any("rejected in shadow, 1 keeps serving" in r.message for r in caplog.records)

    time.sleep(1)  # several looks at the same files
    assert slot.shadow() is None and _model_hash(client, "2")["scored"] == state["scored"]
    # A restart remembers the decision (Redis holds it with the files' fingerprint).
    again = ModelSlot(str(base), "serving_default", 0.2, rollout)
    assert again.current().version == "1"
    time.sleep(1)
    assert again.shadow() is None
    loads = [r for r in caplog.records if r.message.startswith("loading model version")]
    assert len(loads) == 1  # the restarted worker did not load version 2 again to learn it
    assert any("version 2 was rejected before" in r.message for r in caplog.records)
    # New files under the same number: judged afresh.
    card = v2 / "model_card.json"
    os.utime(card, (time.time() + 5, time.time() + 5))
    wait_for(again.shadow, 60, "version 2 in shadow again once its files changed")
    state = _model_hash(client, "2")
    assert state["state"] == "shadow" and "scored" not in state and "decision" not in state


@pytest.mark.timeout(120)
def test_errors_reject_a_version_at_once(redis_url, tiny_model_dir, tmp_path):
    import redis

    from transforms.inference import ModelSlot

    client = redis.Redis.from_url(redis_url)
    base = tmp_path / "models"
    base.mkdir()
    _install(Path(resolve(tiny_model_dir)), base, 1)
    slot = ModelSlot(str(base), "serving_default", 0.2, _rollout(redis_url, tweets=500))
    _install(Path(resolve(tiny_model_dir)), base, 2)
    shadow = wait_for(slot.shadow, 60, "version 2 in shadow")

    def broken(*_):
        raise RuntimeError("out of memory")

    shadow.tfx._run_inference = broken  # this version's calls fail from now on
    assert _serve(slot, _texts(8)) == "1"
    state = _model_hash(client, "2")
    assert state["state"] == "rejected" and state["errors"] == "8"
    assert state["reason"] == "8 errors in shadow (at most 0 allowed)"
    assert slot.current().version == "1"


@pytest.mark.timeout(120)
def test_an_unloadable_version_is_rejected_with_its_reason(redis_url, tiny_model_dir, tmp_path):
    import redis

    from transforms.inference import ModelSlot

    client = redis.Redis.from_url(redis_url)
    base = tmp_path / "models"
    base.mkdir()
    _install(Path(resolve(tiny_model_dir)), base, 1)
    slot = ModelSlot(str(base), "serving_default", 0.2, _rollout(redis_url))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    _install(broken, base, 2)
    state = wait_for(lambda: _model_hash(client, "2").get("state") == "rejected"
                     and _model_hash(client, "2"), 60, "version 2 rejected")
    assert state["reason"].startswith(("OSError", "DecodeError", "ValueError", "IOError"))
    assert slot.current().version == "1" and slot.shadow() is None


@pytest.mark.timeout(120)
def test_immediate_switches_once_the_version_loads(redis_url, tiny_model_dir, tmp_path):
    import redis

    from transforms.inference import ModelSlot

    client = redis.Redis.from_url(redis_url)
    base = tmp_path / "models"
    base.mkdir()
    _install(Path(resolve(tiny_model_dir)), base, 1)
    slot = ModelSlot(str(base), "serving_default", 0.2, _rollout(redis_url, mode="immediate"))
    _install(Path(resolve(tiny_model_dir)), base, 2)
    wait_for(lambda: slot.current().version == "2", 60, "version 2 serving")
    assert slot.shadow() is None
    assert _model_hash(client, "2")["state"] == "serving"
    assert _model_hash(client, "1")["state"] == "retired"


def test_the_gates_and_the_flags():
    from pipeline.pipeline import make_options
    from transforms.rollout import PROMOTE, REJECT, Rollout, judge

    gates = Rollout(tweets=100, min_agreement=0.7, max_errors=1)
    assert judge({"scored": 99, "agreed": 99}, gates) is None
    assert judge({"scored": 100, "agreed": 70}, gates)[0] == PROMOTE
    assert judge({"scored": 100, "agreed": 69}, gates)[0] == REJECT
    assert judge({"scored": 3, "agreed": 3, "errors": 2}, gates) == (
        REJECT, "2 errors in shadow (at most 1 allowed)")
    sampled = sum(Rollout(share=0.25).sampled(t) for t in _texts(300))
    assert 45 <= sampled <= 105  # a quarter, by a hash of the text: the same on every worker
    assert Rollout(share=0.25).sampled(b"x") == Rollout(share=0.25).sampled(b"x")
    rollout = make_options(["--shadow_tweets=60", "--shadow_share=0.5",
                            "--shadow_min_agreement=0.9"]).rollout()
    assert (rollout.mode, rollout.tweets, rollout.share, rollout.min_agreement) == (
        "shadow", 60, 0.5, 0.9)
    for flag in ("--shadow_share=0", "--shadow_tweets=0", "--shadow_min_agreement=2",
                 "--shadow_max_errors=-1"):
        with pytest.raises(ValueError, match=flag.split("=")[0]):
            make_options([flag]).validate_flags()


def _results(client) -> list[dict]:
    return [json.loads(f[b"result"]) for _, f in client.xrange("sentiment:results")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_streaming_a_broken_version_is_rejected_in_shadow_and_a_good_one_promoted(
        pubsub_names, redis_url, tiny_model_dir, default_version, tmp_path, browser):
    """Then the dashboard's page shows the versions' states and shadow figures;
    its screenshot is the README's picture (`make screenshot` saves it to
    docs/dashboard.png)."""
    import apache_beam as beam
    import redis

    from pipeline.pipeline import build, make_options

    base = tmp_path / "bert_sentiment"
    base.mkdir()
    _install(default_version, base, 1)
    options = make_options(["--runner=DirectRunner",
                            f"--input_subscription={pubsub_names['subscription']}",
                            f"--redis_url={redis_url}", f"--model_dir={base}",
                            "--model_reload_seconds=1", "--shadow_tweets=60"])
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    client = redis.Redis.from_url(redis_url)
    result = pipeline.run()
    sent = 0

    def wave(n: int) -> list[str]:
        nonlocal sent
        messages = sample_messages(n, offset=sent)
        sent += n
        publish(pubsub_names["topic"], messages)
        return [json.loads(d)["id"] for d, _ in messages]

    def until(condition, what: str, timeout: float = 180) -> None:
        """Tweets keep coming, a few at a time, until ``condition``."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            wave(4)
            time.sleep(0.5)

    try:
        wave(20)
        wait_for(lambda: len(_results(client)) >= 20, 180, "version 1's results")
        _install(Path(resolve(tiny_model_dir)), base, 2)
        until(lambda: _model_hash(client, "2").get("state") == "rejected", "version 2 rejected")
        v2 = _model_hash(client, "2")
        assert int(v2["scored"]) >= 60 and int(v2["agreed"]) / int(v2["scored"]) < 0.7
        assert "at least 70% needed" in v2["reason"]
        wait_for(lambda: len(_results(client)) >= sent, 120, "every tweet of the shadow")
        assert {r["model_version"] for r in _results(client)} == {"1"}

        _install(default_version, base, 3)
        until(lambda: _model_hash(client, "3").get("state") == "promoted", "version 3 promoted")
        v3 = _model_hash(client, "3")
        assert v3["scored"] == v3["agreed"] and int(v3["scored"]) >= 60
        last = wave(20)
        wait_for(lambda: len(_results(client)) >= sent, 120, "results after the promotion")
        by_id = {r["tweet_id"]: r["model_version"] for r in _results(client)}
        assert {by_id[i] for i in last} == {"3"}
        assert set(by_id.values()) == {"1", "3"}  # version 2 never published a result
    finally:
        result.cancel()
    ids = [r["tweet_id"] for r in _results(client)]
    assert len(ids) == len(set(ids)) == sent  # lost 0, doubled 0
    assert client.xlen("sentiment:deadletter") == 0
    assert _model_hash(client, "1")["state"] == "retired"
    _show_on_the_page(redis_url, browser, tmp_path)


def _show_on_the_page(redis_url: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bertstream.config import RedisConfig
    from ops.dashboard import Dashboard
    from tests.test_dashboard import SCREENSHOT_ENV, console_errors, open_page

    with Dashboard(RedisConfig(url=redis_url), port=0) as dashboard:
        open_page(browser, dashboard.url)
        WebDriverWait(browser, 15).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rollout tbody tr")) == 3)
        rows = {tr.get_attribute("data-version"): [td.text for td in
                                                   tr.find_elements(By.TAG_NAME, "td")]
                for tr in browser.find_elements(By.CSS_SELECTOR, "#rollout tbody tr")}
        assert [rows[v][1] for v in ("3", "2", "1")] == ["promoted", "rejected", "retired"]
        assert "at least 70% needed" in rows["2"][8] and rows["2"][3].endswith("%")
        assert rows["3"][3] == "100.0%"
        assert console_errors(browser) == []
        browser.execute_script("window.scrollTo(0, 0)")
        screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000  # a page, not a blank
