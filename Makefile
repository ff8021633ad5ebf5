# The two commands of the quick start, plus development helpers.
.PHONY: test demo bench bench-smoke fmt lint

test:        ## the whole test suite (installs what it needs)
	bash scripts/test.sh

demo:        ## the proxy with a demo agent and MLflow, on the embedded store
	bash scripts/demo.sh

bench:       ## benchmarks: direct vs proxy vs nginx (several minutes)
	bash bench/run.sh

bench-smoke: ## a seconds-long run of the benchmark harness
	bash bench/run.sh --smoke

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
