# shellcheck shell=bash
# The benchmark harness's smoke run: `bench/run.sh --smoke` (a debug build, tiny loads, one
# round; under a minute once built), after the Rust tests, so that CI notices when the harness
# breaks. Its figures mean nothing; the benchmark itself is `make bench` (docs/BENCHMARKS.md).
# The harness installs nginx, wrk and PostgreSQL from Debian's packages if they are missing and
# stops everything it started when it exits.
fp_bench_smoke() {
  step "benchmark harness (smoke run)"
  bash bench/run.sh --smoke --out "${FP_TEST_TMP:-/tmp}/bench-smoke"
}
FP_TEST_AFTER+=(fp_bench_smoke)
