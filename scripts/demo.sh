#!/usr/bin/env bash
# Ferry's main job on the embedded default: a two-host local cluster on this
# machine runs the demo VM (the test guest) on host1, live-migrates it with
# its local disk to host2, and prints the report.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
guest/build.sh
cargo build --release -p ferry-cli -p ferryd --locked -q

ferry=target/release/ferry
export FERRY_LOCAL_DIR="${FERRY_LOCAL_DIR:-$PWD/target/ferry-local}"
export FERRY_CONFIG="$FERRY_LOCAL_DIR/ferry.toml"
"$ferry" local up --hosts 2

state() { "$ferry" vm show demo -o json 2>/dev/null | sed -n 's/^  "\([a-z]*\)": "\([^"]*\)".*/\1=\2/p'; }
if ! "$ferry" vm show demo >/dev/null 2>&1; then
  "$ferry" vm create -f examples/demo-vm.toml --host host1 --start >/dev/null
elif ! state | grep -q '^state=running$'; then
  "$ferry" vm start demo >/dev/null
fi
host=$(state | sed -n 's/^host=//p')
target=host2
[ "$host" = host2 ] && target=host1

echo "== the demo VM runs on $host; waiting for its guest to be busy" >&2
for _ in $(seq 1 240); do
  if "$ferry" vm console demo -n 200 | grep -q 'mem-oracle pass='; then break; fi
  sleep 0.5
done
"$ferry" vm console demo -n 3

echo "== live-migrating demo ($host → $target) with its local disk" >&2
"$ferry" migrate demo --to "$target" --wait

echo
"$ferry" vm console demo -n 3
echo
echo "The cluster keeps running: $ferry vm list, $ferry migration list," >&2
echo "$ferry vm console demo --follow, and $ferry local down --purge to remove it" >&2
echo "(with FERRY_LOCAL_DIR=$FERRY_LOCAL_DIR)." >&2
