#!/bin/sh
# The compose stack's credentials, made at its first start and never again (a one-shot
# service runs this at every `up`; what exists is kept). Nothing here is ever committed:
# everything lives in the stack's `credentials` volume.
#
#   redis-password   Redis's password (random, 256 bits); the routers and the worker read it
#   redis.conf       `requirepass` for redis-server
#   api-keys.yaml    the routers' api_keys_file: an `admin` key (admin + executor roles,
#                    every pool), stored as its SHA-256 only. The key itself is printed once,
#                    below: `docker-compose logs credentials` shows it.
#
# More keys: docker-compose run --rm credentials new-key NAME [--role R] [--pool P]
set -eu
dir=/credentials
umask 077
if [ "$#" -gt 0 ]; then  # `run --rm credentials new-key …`: add a key to the stack's file
  sessionpool "$@" --file "$dir/api-keys.yaml"
  chmod 0644 "$dir/api-keys.yaml"
  exit 0
fi
if [ ! -s "$dir/redis-password" ]; then
  python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "$dir/.redis-password"
  mv "$dir/.redis-password" "$dir/redis-password"
  echo "credentials: made a Redis password"
fi
if [ ! -s "$dir/redis.conf" ]; then
  printf 'requirepass %s\n' "$(cat "$dir/redis-password")" > "$dir/.redis.conf"
  mv "$dir/.redis.conf" "$dir/redis.conf"
fi
if [ ! -s "$dir/api-keys.yaml" ]; then
  sessionpool new-key admin --role admin --role executor --file "$dir/api-keys.yaml" 2>&1
  echo "credentials: made the admin key above; it is shown only this once"
fi
# Read by the redis user and the routers' uid; only this stack's services mount the volume.
chmod 0755 "$dir"
chmod 0644 "$dir/redis-password" "$dir/redis.conf" "$dir/api-keys.yaml"
echo "credentials: ready"
