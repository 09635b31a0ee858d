#!/usr/bin/env bash
# Make sure this user has a Ray cluster token (token authentication is on in every farm cluster).
# Ray reads it from $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a new one is made
# by Ray itself (`ray get-auth-token --generate`), readable by this user only (mode 0600).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"
[ -n "${RAY_AUTH_TOKEN:-}" ] && exit 0
token=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
if [ ! -s "$token" ]; then
  ( umask 077; mkdir -p "$(dirname "$token")"
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
      python3 -c "import secrets; print(secrets.token_hex(32), end='')" >"$token"  # ray's --generate writes ~ only
    else
      ray get-auth-token --generate >/dev/null 2>&1
    fi )
  echo "farm: created a Ray cluster token in $token (mode 0600)"
fi
chmod 600 "$token"
