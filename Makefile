# make demo | make test | make bench — each runs scripts/setup first (idempotent).
VENV ?= /opt/verlcpp/venv
BUILD_DIR ?= build
PY := $(VENV)/bin/python
export VERLCPP_VENV := $(VENV)
export BUILD_DIR

.PHONY: setup build demo test bench fuzz clean

setup:
	@bash scripts/setup

build: setup

demo: setup
	@bash scripts/demo

test: setup
	@cd $(BUILD_DIR) && ctest --output-on-failure -j2 --timeout 900

bench: setup
	@$(PY) bench/merge/bench_merge.py
	@$(PY) bench/merge_megatron/bench_merge_megatron.py
	@$(PY) bench/logprob/bench_logprob.py
	@$(PY) bench/train/bench_train.py
	@$(PY) bench/verl_engine/bench_verl_engine.py

fuzz:
	@bash fuzz/run.sh

clean:
	rm -rf $(BUILD_DIR) build-fuzz
