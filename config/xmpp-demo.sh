#!/usr/bin/env bash
# The XMPP example on one machine: two Prosody servers on loopback (client ports 15222 and
# 25222, BOSH 15280 and 25280; users alice and bob, password "secret", on each) and the
# balancer as config/xmpp.toml says (5222, 5223, 7070, 7443, 9090; admin 8404). Run from the
# repository root after `balancer certs`; Ctrl-C stops all three. Needs Debian's prosody.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v prosody >/dev/null || { echo "prosody is not installed: apt-get install prosody" >&2; exit 2; }
[ -f certs/server.crt ] || { echo "no certs/server.crt: run 'balancer certs' first" >&2; exit 2; }
balancer="${BALANCER:-balancer}"
command -v "$balancer" >/dev/null || balancer=".venv/bin/balancer"
work="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$work"' EXIT   # the balancer drains
trap 'exit 130' INT TERM
for n in 1 2; do
  dir="$work/xmpp$n"
  mkdir -p "$dir/data/localhost/accounts"
  for user in alice bob; do
    printf 'return {\n\t["password"] = "secret";\n};\n' > "$dir/data/localhost/accounts/$user.dat"
  done
  sed -e "s|@DIR@|$dir|g" -e "s|@C2S_PORT@|${n}5222|" -e "s|@HTTP_PORT@|${n}5280|" \
      -e "s|@CERTS@|$PWD/certs|g" config/prosody/server.cfg.lua.in > "$dir/prosody.cfg.lua"
  prosody -F --config "$dir/prosody.cfg.lua" &
  pids+=($!)
done
echo "xmpp1 on 127.0.0.1:15222, xmpp2 on 127.0.0.1:25222 (logs in $work/xmpp*/prosody.log)"
echo "log in as alice@localhost / secret on 127.0.0.1:5222 (STARTTLS) or :5223 (direct TLS);"
echo "curl -s http://127.0.0.1:8404/backends shows where each session went"
echo "(the two servers are not clustered: users on xmpp1 and on xmpp2 cannot reach each other)"
"$balancer" run -c config/xmpp.toml &
pids+=($!)
wait "${pids[-1]}"
