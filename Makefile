# The two commands of the quick start, plus development helpers.
.PHONY: test demo bench bench-smoke soak fmt lint

test:        ## the whole test suite (installs what it needs)
	bash scripts/test.sh

demo:        ## the proxy with a demo agent and MLflow, on the embedded store
	bash scripts/demo.sh

bench:       ## benchmarks: direct vs proxy vs nginx (several minutes)
	bash bench/run.sh

bench-smoke: ## a seconds-long run of the benchmark harness
	bash bench/run.sh --smoke

SOAK_SECONDS ?= 1800
soak:        ## soak: chats and votes for SOAK_SECONDS (default 30 min) while MLflow flaps and Postgres restarts
	bash scripts/soak.sh --seconds $(SOAK_SECONDS)

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
