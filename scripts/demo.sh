#!/usr/bin/env bash
# Ferry's main job on the embedded default: a local cluster on this machine
# runs the demo VM (the test guest) and shows it alive.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
guest/build.sh
cargo build --release --bins --locked -q

ferry=target/release/ferry
export FERRY_LOCAL_DIR="${FERRY_LOCAL_DIR:-$PWD/target/ferry-local}"
"$ferry" local up --hosts 2
if ! "$ferry" vm show demo >/dev/null 2>&1; then
  "$ferry" vm create -f examples/demo-vm.toml --host host1 --start
elif [ "$("$ferry" vm show demo -o json | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p')" != running ]; then
  "$ferry" vm start demo
fi
echo "== waiting for the demo guest's heartbeat" >&2
for _ in $(seq 1 120); do
  if "$ferry" vm console demo -n 5 | grep -q 'heartbeat seq='; then break; fi
  sleep 0.5
done
"$ferry" vm show demo
echo
"$ferry" vm console demo -n 5
echo
echo "The cluster keeps running: $ferry vm list, $ferry vm console demo --follow," >&2
echo "and $ferry local down --purge to remove it (FERRY_LOCAL_DIR=$FERRY_LOCAL_DIR)." >&2
