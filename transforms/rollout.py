"""How a new model version takes over: at once, or after it has proven itself in shadow.

``--model_rollout=shadow`` (the default where a new version can appear): a new
version that loads is not switched to. It scores the same live tweets as the
serving version (all, or ``--shadow_share`` of them, picked by a hash of the
text), its results are not published, and how it compares is counted in Redis:
tweets scored, tweets given the serving version's label, errors, its label mix,
its mean confidence and time. Once ``--shadow_tweets`` tweets are counted, the
gates decide: a version that agreed on fewer than ``--shadow_min_agreement`` of
them, or failed more than ``--shadow_max_errors`` times, is rejected (with the
reason, and not tried again until its files change); any other is promoted and
serves from then on. The counts are shared through Redis, so every worker of a
cluster judges a version on the same figures and follows the first decision
written (``HSETNX``). ``--model_rollout=immediate`` switches to a new version as
soon as it loads and scores one check text.

Every result carries the version that served it, and each tweet is scored by
exactly one serving version, so across a promotion there is one result per
tweet. Redis layout (``RedisConfig``): the set ``models_key`` of versions met,
and per version the hash ``model_prefix + version``: ``state`` (serving,
shadow, promoted, rejected, retired), ``reason``, ``since``, ``fingerprint``,
``decision``, ``scored``, ``agreed``, ``errors``, ``label:<label>``,
``confidence_milli``, ``batches``, ``latency_ms``. The dashboard shows them and
``GET /metrics`` exports them.
"""

import logging
import time
import zlib
from typing import NamedTuple, Optional

from bertstream.config import RedisConfig, connect
from transforms.contract import LABELS, now_iso

_LOG = logging.getLogger(__name__)

SHADOW, IMMEDIATE = "shadow", "immediate"
PROMOTE, REJECT = "promote", "reject"


class Rollout(NamedTuple):
    """``--model_rollout`` and the shadow's gates; ``redis`` holds the counts."""

    mode: str = SHADOW
    redis: RedisConfig = RedisConfig()
    share: float = 1.0
    tweets: int = 500
    min_agreement: float = 0.7
    max_errors: int = 0

    def validate(self) -> None:
        if self.mode not in (SHADOW, IMMEDIATE):
            raise ValueError(f"--model_rollout must be {SHADOW} or {IMMEDIATE}")
        if not 0 < self.share <= 1:
            raise ValueError("--shadow_share must be in (0, 1]")
        if self.tweets < 1:
            raise ValueError("--shadow_tweets must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("--shadow_min_agreement must be in [0, 1]")
        if self.max_errors < 0:
            raise ValueError("--shadow_max_errors must not be negative")

    def sampled(self, text: bytes) -> bool:
        """Whether a tweet is scored in shadow: the same tweets on every worker."""
        return self.share >= 1 or zlib.crc32(text) % 10_000 < self.share * 10_000


def judge(totals: dict, rollout: Rollout) -> Optional[tuple[str, str]]:
    """``(PROMOTE or REJECT, reason)`` once enough tweets were scored in shadow, else None."""
    scored = int(totals.get("scored", 0))
    errors = int(totals.get("errors", 0))
    if errors > rollout.max_errors:
        return REJECT, f"{errors} errors in shadow (at most {rollout.max_errors} allowed)"
    if scored < rollout.tweets:
        return None
    agreement = int(totals.get("agreed", 0)) / scored
    if agreement < rollout.min_agreement:
        return REJECT, (f"agreed with the serving version on {agreement:.1%} of {scored} "
                        f"tweets (at least {rollout.min_agreement:.0%} needed)")
    return PROMOTE, f"agreed on {agreement:.1%} of {scored} tweets, {errors} errors"


class ShadowLedger:
    """The versions' states and shadow counts in Redis (one client per process)."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout
        self._config = rollout.redis
        self._client = connect(self._config._replace(retries=1))

    def _key(self, version: str) -> str:
        return self._config.model_prefix + version

    def serving(self, version: str, fingerprint: str, retired: Optional[str] = None,
                state: str = "serving") -> None:
        """Marks ``version`` (with these files) as the one results come from:
        ``serving``, or ``promoted`` when it came through the shadow."""
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(self._config.models_key, version)
        pipe.hset(self._key(version), mapping={"state": state, "since": now_iso(),
                                               "fingerprint": fingerprint})
        if retired:
            pipe.hset(self._key(retired), mapping={"state": "retired", "since": now_iso()})
        pipe.execute()

    def states(self, versions: list[str]) -> dict[str, dict[str, str]]:
        """What Redis holds for each of ``versions`` (state, fingerprint, decision)."""
        pipe = self._client.pipeline(transaction=False)
        for version in versions:
            pipe.hmget(self._key(version), "state", "fingerprint", "decision")
        return {v: {name: (value or b"").decode() for name, value in
                    zip(("state", "fingerprint", "decision"), row)}
                for v, row in zip(versions, pipe.execute())}

    def start_shadow(self, version: str, version_dir: str, fingerprint: str) -> Optional[str]:
        """Registers a version in shadow, unless it was judged already with these
        files: returns that decision then (a worker that comes late follows it)."""
        key = self._key(version)
        known = {k.decode(): v.decode() for k, v in self._client.hgetall(key).items()}
        if known.get("fingerprint") == fingerprint and known.get("decision"):
            return known["decision"]
        if known.get("fingerprint") == fingerprint and known.get("state") == SHADOW:
            return None  # another worker started it: count beside it
        # New files under this version number: its old figures go (field by
        # field; the sink's ACL user has no DEL).
        pipe = self._client.pipeline(transaction=False)
        stale = [f for f in known if f not in ("state", "since", "version_dir", "fingerprint")]
        if stale:
            pipe.hdel(key, *stale)
        pipe.hset(key, mapping={"state": SHADOW, "since": now_iso(), "version_dir": version_dir,
                                "fingerprint": fingerprint})
        pipe.sadd(self._config.models_key, version)
        pipe.execute()
        return None

    def unloadable(self, version: str, version_dir: str, fingerprint: str, reason: str) -> None:
        """A version that did not load (or failed its check text) is rejected at once."""
        key = self._key(version)
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(self._config.models_key, version)
        pipe.hset(key, mapping={"state": "rejected", "since": now_iso(), "reason": reason,
                                "version_dir": version_dir, "fingerprint": fingerprint,
                                "decision": REJECT, "decided_at": now_iso()})
        pipe.execute()

    def record(self, version: str, scored: int, agreed: int, errors: int, labels: dict,
               confidence: float, seconds: float) -> dict:
        """Adds one batch's figures; returns the version's totals now."""
        key = self._key(version)
        pipe = self._client.pipeline(transaction=False)
        pipe.hincrby(key, "scored", scored)
        pipe.hincrby(key, "agreed", agreed)
        pipe.hincrby(key, "errors", errors)
        for label, n in labels.items():
            if n:
                pipe.hincrby(key, f"label:{label}", n)
        pipe.hincrby(key, "confidence_milli", int(confidence * 1000))
        pipe.hincrby(key, "batches", 1)
        pipe.hincrby(key, "latency_ms", int(seconds * 1000))
        total_scored, total_agreed, total_errors, *_ = pipe.execute()
        return {"scored": total_scored, "agreed": total_agreed, "errors": total_errors}

    def decide(self, version: str, decision: str, reason: str) -> tuple[str, str]:
        """Writes a decision unless one is there; returns the one that stands."""
        key = self._key(version)
        if self._client.hsetnx(key, "decision", decision):
            self._client.hset(key, mapping={
                "state": "promoted" if decision == PROMOTE else "rejected", "reason": reason,
                "decided_at": now_iso()})
        stood = self._client.hmget(key, "decision", "reason")
        return stood[0].decode(), (stood[1] or b"").decode()

    def decision(self, version: str) -> Optional[tuple[str, str]]:
        stood = self._client.hmget(self._key(version), "decision", "reason")
        return (stood[0].decode(), (stood[1] or b"").decode()) if stood[0] else None

    def close(self) -> None:
        self._client.close()


class ShadowBatch(NamedTuple):
    """One batch scored in shadow, against the serving version's labels."""

    scored: int
    agreed: int
    errors: int
    labels: dict
    confidence: float
    seconds: float


def compare(serving, shadow, seconds: float) -> ShadowBatch:
    """Figures of a batch both versions scored (probability rows in LABELS order)."""
    import numpy as np

    serving, shadow = np.asarray(serving), np.asarray(shadow)
    served, proposed = serving.argmax(axis=1), shadow.argmax(axis=1)
    labels = {label: int((proposed == i).sum()) for i, label in enumerate(LABELS)}
    return ShadowBatch(len(proposed), int((served == proposed).sum()), 0, labels,
                       float(shadow.max(axis=1).sum()), seconds)


def failed(n: int, seconds: float) -> ShadowBatch:
    return ShadowBatch(0, 0, n, {}, 0.0, seconds)


def clock() -> float:
    return time.monotonic()
