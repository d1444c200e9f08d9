"""Shared fixtures: real servers on loopback and a tiny real SavedModel.

Servers are started once per session and stopped by PID at the end; tests get
a clean Redis database each (FLUSHALL) and their own Pub/Sub topics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from bertstream.config import cache_dir
from runners.local_servers import LocalPubSubEmulator, LocalRedis, find_pubsub_emulator

ROOT = Path(__file__).resolve().parent.parent
CACHE = cache_dir()


@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(tmp_path_factory):
    """The temporary directory of this session and of every process it starts
    (TMPDIR): one directory under pytest's base temp, which pytest prunes to
    the last three runs. Beam's portable runners leave a staging directory in
    it per job submission (``tmp*/submission_environment_dependencies.txt``,
    ``beam-pipeline-temp*``, ``beam-temp*``), and each job a test starts keeps
    its Redis data for a restart (``bertstream-redis-*``): about fifty a run
    that would otherwise pile up in /tmp. (The JVMs ignore TMPDIR.) The
    walkthroughs print those Redis paths; scripts/walkthrough.py masks the
    directory they are in."""
    path = tmp_path_factory.mktemp("tmp", numbered=False)
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(path)
    yield path
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


@pytest.fixture(scope="session")
def redis_server():
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def pubsub_emulator():
    if find_pubsub_emulator() is None:
        pytest.fail("the Pub/Sub emulator is not installed (Debian package "
                    "google-cloud-cli-pubsub-emulator); integration tests need it")
    with LocalPubSubEmulator() as emulator:
        old = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        yield emulator
        if old is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = old


@pytest.fixture
def pubsub_names(pubsub_emulator):
    """A fresh topic and subscription on the emulator (both created)."""
    from google.cloud import pubsub_v1

    project = "bertstream-test"
    suffix = uuid.uuid4().hex[:8]
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, f"tweets-{suffix}")
    subscription = subscriber.subscription_path(project, f"tweets-sub-{suffix}")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    yield {"project": project, "topic": topic, "subscription": subscription}
    subscriber.close()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny real SavedModel (seconds to build, cached between runs)."""
    out = CACHE / "test-models" / "bert_sentiment_tiny"
    subprocess.run([sys.executable, "-m", "model", "build", "--tiny", "--out", str(out)],
                   check=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through selenium, for the dashboard's page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("the dashboard's browser tests need Debian's chromium and chromium-driver: "
                    "`make chromium` (as root) or `sudo apt-get install -y chromium "
                    "chromium-driver`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -c constraints.txt -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1280,1100",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
