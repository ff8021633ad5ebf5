# shellcheck shell=bash
# The soak harness's CI version: `scripts/soak.sh --seconds 60` (debug build: the one the Rust
# tests just built, so nothing is compiled; the soak checks delivery and leaks, not speed), after
# the Rust tests. One MLflow flap and one Postgres restart (the test setup's restartable
# cluster, idle once the tests are done) during a minute of chats and votes; fails when a vote
# is lost, duplicated or wrong, or the outbox does not drain. Its own mlflow server, agent and
# proxy (it stops and starts that mlflow). The 30-minute run is `make soak` (docs/BENCHMARKS.md).
fp_soak_smoke() {
  step "soak harness (60 s)"
  SOAK_RATE=${FP_SOAK_CI_RATE:-2} bash "$FP_REPO_ROOT/scripts/soak.sh" --seconds "${FP_SOAK_CI_SECONDS:-60}" --profile debug \
    --out "${FP_TEST_TMP:-/tmp}/soak"
}
FP_TEST_AFTER+=(fp_soak_smoke)
