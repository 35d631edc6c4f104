#!/usr/bin/env bash
# The test command: installs what is missing, builds the test guest, checks
# formatting and lints, and runs the whole suite (unit, integration and
# end-to-end tests with real QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check

scripts/setup.sh
guest/build.sh

echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build" >&2
# End-to-end tests drive the real binaries (ferry, ferryd): build them first.
cargo build --workspace --bins --locked
echo "== cargo test" >&2
cargo test --workspace --locked -- "$@"
