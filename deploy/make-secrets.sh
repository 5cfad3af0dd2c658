#!/bin/sh
# Creates the secret files compose.yaml mounts, in ./secrets (next to this script), without
# overwriting any that exist: a random Redis password with the matching REDIS_URL, a random
# Grafana admin password, and empty platform token files to fill in (an empty file is an
# unset setting: leave slack_app_token empty unless you use Socket Mode).
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 700 secrets

random_hex() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

write() { # NAME CONTENT: only when missing; world-readable inside the 0700 folder, so that
          # the containers' non-root users (redis 999, chatbot 10001) can read the mount.
    if [ ! -e "secrets/$1" ]; then
        printf '%s\n' "$2" > "secrets/$1"
        chmod 644 "secrets/$1"
        echo "created secrets/$1"
    fi
}

if [ ! -e secrets/redis_password ]; then
    password="$(random_hex)"
    write redis_password "$password"
    rm -f secrets/redis_url
    write redis_url "redis://:$password@redis:6379/0"
fi
write grafana_admin_password "$(random_hex)"
for token in slack_bot_token slack_signing_secret slack_app_token discord_token; do
    write "$token" ""
done
