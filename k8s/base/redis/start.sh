#!/bin/sh
# Redis's entrypoint in k8s: writes the ACL file from the Secret redis-auth
# (passwords as SHA-256 hashes, never in clear on disk), then starts Redis.
set -eu
hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
umask 077
cat > /run/redis/users.acl <<ACL
user default on #$(hash "$REDIS_ADMIN_PASSWORD") ~* &* +@all
user bertstream on #$(hash "$REDIS_SINK_PASSWORD") resetkeys ~sentiment:* resetchannels &sentiment* -@all +set +xadd +publish +hincrby +hgetall +hset +hsetnx +hmget +hdel +sadd +xrange +xrevrange +expire +evalsha +eval +script|load +script|exists +ping +hello +auth +client|setinfo +client|setname +client|id
user dashboard on #$(hash "$REDIS_DASHBOARD_PASSWORD") resetkeys %R~sentiment:* resetchannels -@all +xrevrange +xread +hgetall +smembers +pubsub|numsub +ping +hello +auth +client|setinfo +client|setname +client|id
ACL
exec redis-server /etc/redis/redis.conf