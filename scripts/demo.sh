#!/usr/bin/env bash
# The streaming walkthroughs' surroundings (docs/streaming.md), started and stopped by PID:
#   scripts/demo.sh up     the Pub/Sub emulator on 127.0.0.1:8085, redis-server on
#                          127.0.0.1:6379 (append-only file in /tmp/bertstream-demo/redis),
#                          the topic projects/bertstream-dev/topics/tweets and its
#                          subscription .../subscriptions/tweets-sub
#   scripts/demo.sh down   stops both
# Then: export PUBSUB_EMULATOR_HOST=127.0.0.1:8085
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=/tmp/bertstream-demo
PROJECT=bertstream-dev
PY=.venv/bin/python

up() {
  for port in 8085 6379; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "demo: something already listens on 127.0.0.1:$port (a demo still up? scripts/demo.sh down)" >&2
      exit 1
    fi
  done
  local emulator
  emulator=$(dpkg -L google-cloud-cli-pubsub-emulator 2>/dev/null | grep 'bin/cloud-pubsub-emulator$' || true)
  if [ -z "$emulator" ]; then
    echo "demo: the Pub/Sub emulator is not installed (Debian package google-cloud-cli-pubsub-emulator)" >&2
    exit 1
  fi
  mkdir -p "$DIR/redis" "$DIR/pubsub"
  setsid "$emulator" --host=127.0.0.1 --port=8085 --dir="$DIR/pubsub" >"$DIR/emulator.log" 2>&1 &
  echo $! >"$DIR/emulator.pid"
  redis-server --bind 127.0.0.1 --port 6379 --appendonly yes --dir "$DIR/redis" \
    --logfile "$DIR/redis.log" --daemonize no &
  echo $! >"$DIR/redis.pid"
  for _ in $(seq 1 120); do
    grep -q "Server started" "$DIR/emulator.log" 2>/dev/null && break
    sleep 0.5
  done
  grep -q "Server started" "$DIR/emulator.log" || { echo "demo: the emulator did not start: $DIR/emulator.log" >&2; exit 1; }
  PUBSUB_EMULATOR_HOST=127.0.0.1:8085 "$PY" -c "
from google.cloud import pubsub_v1
topic = 'projects/$PROJECT/topics/tweets'
pubsub_v1.PublisherClient().create_topic(name=topic)
pubsub_v1.SubscriberClient().create_subscription(
    name='projects/$PROJECT/subscriptions/tweets-sub', topic=topic, ack_deadline_seconds=60)"
  echo "demo: emulator on 127.0.0.1:8085, redis-server on 127.0.0.1:6379, topic projects/$PROJECT/topics/tweets, subscription projects/$PROJECT/subscriptions/tweets-sub"
}

down() {
  for name in redis emulator; do
    if [ -f "$DIR/$name.pid" ]; then
      pid=$(cat "$DIR/$name.pid")
      if [ "$name" = emulator ]; then kill -- "-$pid" 2>/dev/null || true; else kill "$pid" 2>/dev/null || true; fi
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      rm -f "$DIR/$name.pid"
    fi
  done
  rm -rf "$DIR"
  echo "demo: stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: scripts/demo.sh up|down" >&2; exit 2 ;;
esac
