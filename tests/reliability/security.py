"""Security checks: an ACL user with only what the sink needs, TLS with a
certificate made here, and no secret in logs, ``--help``, ``--dry_run``
output or dead-letter entries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import redis

from runners.local_servers import LocalRedis, free_port
from tests.reliability.harness import (
    DEADLETTER,
    RESULTS,
    ROOT,
    Ctx,
    client_for,
    make_tweets,
    tally,
)

# What the sink sends (transforms/redis_sink.py): the two Lua scripts
# (EVALSHA, SCRIPT LOAD/EXISTS when the cache is cold, and inside them SET,
# XADD, PUBLISH, HINCRBY, EXPIRE), HGETALL of the totals and XRANGE/XREVRANGE
# of the dead letters for the job's summary, the model versions' states and
# shadow figures (transforms/rollout.py: HSET, HSETNX, HMGET, HDEL, HINCRBY,
# SADD), PING at start, and
# redis-py's connection handshake (AUTH, CLIENT SETINFO). k8s/base/redis
# grants the same list.
SINK_ACL = ["resetkeys", "~sentiment:*", "resetchannels", "&sentiment*", "-@all",
            "+set", "+xadd", "+publish", "+hincrby", "+hgetall", "+hset", "+hsetnx", "+hmget",
            "+hdel", "+sadd", "+xrange", "+xrevrange", "+expire", "+evalsha", "+eval",
            "+script|load", "+script|exists", "+ping", "+hello", "+auth", "+client|setinfo",
            "+client|setname", "+client|id"]
BAD_LINES = [b'{"id": "1", "text": ', b"\xff\xfe not utf-8"]


def _secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _tweets_file(path: Path, n: int, first_id: int) -> list[str]:
    tweets = make_tweets(n, first_id, "secure")
    with path.open("wb") as f:
        for t in tweets:
            f.write(json.dumps(t, ensure_ascii=False).encode() + b"\n")
        for line in BAD_LINES:
            f.write(line + b"\n")
    return [t["id"] for t in tweets]


def _pipeline(ctx: Ctx, *args: str, env: dict | None = None,
              local_redis: bool = False) -> subprocess.CompletedProcess:
    """``python -m pipeline``; without ``local_redis`` it never starts a
    redis-server of its own."""
    flags = [] if local_redis else ["--no_local_redis"]
    return subprocess.run([sys.executable, "-m", "pipeline", "--runner=DirectRunner",
                           "--model_dir", str(ctx.model_dir), *flags, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _dump(client: redis.Redis) -> str:
    """Every entry of the results and dead-letter streams, as text."""
    return "\n".join(repr(fields) for stream in (RESULTS, DEADLETTER)
                     for _, fields in client.xrange(stream))


def acl_user(ctx: Ctx) -> dict:
    """The pipeline as an ACL user limited to the sink's keys and commands:
    it works; wrong credentials stop it at start (exit 2, naming
    --redis_url); the passwords appear nowhere."""
    admin_pw, sink_pw, wrong_pw = _secret("admin"), _secret("sink"), _secret("wrong")
    n = 60 if ctx.full else 20
    server = LocalRedis(password=admin_pw).start()
    admin = client_for(server.url)
    try:
        admin.execute_command("ACL", "SETUSER", "bertstream", "on", f">{sink_pw}",
                              *[r for r in SINK_ACL if r != "+client|setinfo"])
        try:  # CLIENT SETINFO is Redis 7.2+ (redis-py ignores its absence)
            admin.execute_command("ACL", "SETUSER", "bertstream", "+client|setinfo")
        except redis.ResponseError:
            pass
        ids = _tweets_file(ctx.work_dir / "acl.jsonl", n, 1_876_000_000_000_000_000)
        base = f"127.0.0.1:{server.port}/0"
        # The password in the URL (redacted in every line the job prints)...
        ok = _pipeline(ctx, "--input_file", str(ctx.work_dir / "acl.jsonl"),
                       "--redis_url", f"redis://bertstream:{sink_pw}@{base}")
        assert ok.returncode == 0, ok.stderr[-3000:]
        # ...and from REDIS_PASSWORD, with a wrong one: stopped at start.
        wrong = _pipeline(ctx, "--input_file", str(ctx.work_dir / "acl.jsonl"),
                          "--redis_url", f"redis://bertstream@{base}",
                          env={"REDIS_PASSWORD": wrong_pw})
        wrong_inline = _pipeline(ctx, "--input_file", str(ctx.work_dir / "acl.jsonl"),
                                 "--redis_url", f"redis://bertstream:{wrong_pw}@{base}")
        sink = client_for(f"redis://bertstream:{sink_pw}@{base}")
        denied = []
        for command in (("GET", "other:key"), ("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"),
                        ("DEL", "sentiment:results")):
            try:
                sink.execute_command(*command)
            except redis.exceptions.NoPermissionError:
                denied.append(command[0])
        sink.close()
        counts = tally(admin, ids, expected_dead=())
        texts = [ok.stdout, ok.stderr, wrong.stdout, wrong.stderr, wrong_inline.stdout,
                 wrong_inline.stderr, _dump(admin)]
        counts.update(
            dead_letters_parse=admin.hgetall("sentiment:stats").get(b"dead_letters:parse"),
            wrong_credentials_exit=[wrong.returncode, wrong_inline.returncode],
            wrong_credentials_message=wrong.stderr.strip().splitlines()[-1:],
            names_flag=all("--redis_url" in p.stderr for p in (wrong, wrong_inline)),
            denied=denied,
            secret_leaks=sum(s in t for s in (admin_pw, sink_pw, wrong_pw) for t in texts))
        counts["dead_letters_parse"] = int(counts["dead_letters_parse"] or 0)
        return counts
    finally:
        admin.close()
        server.stop()


def tls(ctx: Ctx) -> dict:
    """``rediss://`` to a redis-server serving TLS with a certificate made
    here (openssl): the job writes through it with ``--redis_ca_file``; without
    the CA it stops at start instead of writing anywhere else."""
    from bertstream.config import RedisConfig, check_connection
    from pipeline.pipeline import run

    cert, key = ctx.work_dir / "redis.pem", ctx.work_dir / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    server = LocalRedis(port=port, extra_args=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
        "--tls-auth-clients", "no"]).start()
    url = f"rediss://127.0.0.1:{port}/0"
    n = 40 if ctx.full else 12
    client = redis.Redis.from_url(url, ssl_ca_certs=str(cert), socket_timeout=30)
    try:
        ids = _tweets_file(ctx.work_dir / "tls.jsonl", n, 1_877_000_000_000_000_000)
        check_connection(RedisConfig(url=url, ca_file=str(cert)))
        run(["--runner=DirectRunner", "--input_file", str(ctx.work_dir / "tls.jsonl"),
             "--redis_url", url, "--redis_ca_file", str(cert), "--model_dir",
             str(ctx.model_dir)])
        counts = tally(client, ids)
        plain = _pipeline(ctx, "--input_file", str(ctx.work_dir / "tls.jsonl"),
                          "--redis_url", url, local_redis=True)  # CA not in the system roots
        counts.update(redis_version=client.execute_command("INFO", "server").get(
                          "redis_version"),
                      without_ca_exit=plain.returncode,
                      without_ca_message=plain.stderr.strip().splitlines()[-1:],
                      without_ca_started_own_redis="starting a redis-server" in plain.stderr)
        return counts
    finally:
        client.close()
        server.stop()


def no_secrets_in_output(ctx: Ctx) -> dict:
    """``--help`` and ``--dry_run`` outputs with a Redis password and an X
    bearer token about (in the environment and in flags)."""
    password, token = _secret("redispw"), _secret("bearer")
    env = {"REDIS_PASSWORD": password, "X_BEARER_TOKEN": token}
    url = f"redis://bertstream:{password}@redis:6379/0"
    sub = "projects/p/subscriptions/tweets-sub"
    runs = {
        "pipeline --help": [sys.executable, "-m", "pipeline", "--help"],
        "replay_deadletter --help": [sys.executable, "-m", "ops.replay_deadletter",
                                     "--help"],
        "ingest --help": [sys.executable, "-m", "ingest", "--help"],
        "launcher flink --dry_run": [sys.executable, "-m", "launcher", "flink", "--dry_run",
                                     "--flink_master=[local]", f"--input_subscription={sub}",
                                     f"--model_dir={ctx.model_dir}", f"--redis_url={url}"],
    }
    if ctx.full:
        runs["launcher dataflow --dry_run"] = [
            sys.executable, "-m", "launcher", "dataflow", "--dry_run", "--project=p",
            "--region=europe-west1", "--temp_location=gs://b/tmp",
            f"--input_subscription={sub}", f"--model_dir={ctx.model_dir}",
            f"--redis_url={url}"]
    checked, leaks, failed = [], [], []
    for name, argv in runs.items():
        if name.startswith("launcher") and not (ROOT / "launcher").is_dir():
            continue
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240,
                              env={**os.environ, **env})
        if done.returncode != 0:
            failed.append(f"{name}: exit {done.returncode}: {done.stderr[-300:]}")
        checked.append(name)
        if password in done.stdout + done.stderr or token in done.stdout + done.stderr:
            leaks.append(name)
    return {"checked": checked, "leaks": leaks, "failed": failed}
