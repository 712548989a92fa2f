#!/usr/bin/env bash
# Builds every fuzz target once and runs each for SECONDS (default 20) from its committed seeds
# (fuzz/corpus/TARGET/seed-*). Exits non-zero if any target crashes, times out on one input or
# goes past the memory limits; the reproducer is left in fuzz/artifacts/TARGET/. See
# docs/security.md, "Fuzzing".
#
#   fuzz/run-all.sh [SECONDS] [TARGET...]
#
# Toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module); the
# stable rustc accepts them under RUSTC_BOOTSTRAP=1, and the x86_64 rust-std ships the ASan
# runtime, so CI needs nothing but the stable toolchain and g++ (libFuzzer is C++).
# FUZZ_SANITIZER=none builds without ASan (faster; Rust's own bounds checks still panic).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-20}
shift || true
sanitizer=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1
export CARGO_INCREMENTAL=0

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    # `gen_corpus` is the seed writer, not a target.
    mapfile -t targets < <(cargo fuzz list | grep -vx gen_corpus)
fi

start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s"

failed=()
for target in "${targets[@]}"; do
    # New inputs go to a scratch corpus (ignored by git), never into the committed seeds.
    mkdir -p "work/$target"
    echo "=== fuzz $target for ${seconds}s"
    # -malloc_limit_mb: one allocation above 512 MiB is a crash (the largest legitimate buffer is
    # a 65 MiB OSD frame), so a length field from the input cannot size an allocation.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
        -print_final_stats=1 2>"work/$target.log"; then
        failed+=("$target")
        tail -n 60 "work/$target.log" >&2
    fi
    grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec|^#[0-9]+.*DONE' \
        "work/$target.log" || true
done
echo "fuzz: ${#targets[@]} targets in $(($(date +%s) - start)) s"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
    exit 1
fi
