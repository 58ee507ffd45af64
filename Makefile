# Set-up is part of every target: a fresh machine needs only `make train` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?= --config debug

.PHONY: setup train test test-unit test-e2e test-slurm lint docs slurm-packages browser-packages

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

train: setup
	$(VENV)/bin/cifar-dist train $(ARGS)

# The tests start a real local Slurm (slurm/dev-cluster.sh) and drive `cifar-dist serve`'s upload
# page in a real headless Chromium (tests/e2e/test_serve.py); their Debian packages come first. Two
# workers: many tests wait on a scheduler or a child process; the Slurm tests share one worker.
PYTEST := $(VENV)/bin/pytest -q -n 2 --dist loadgroup
test: setup slurm-packages browser-packages
	$(PYTEST) $(PYTEST_ARGS)

# One tier each (tests/__init__.py says what belongs where): unit needs neither Slurm nor a training command.
test-unit: setup
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-e2e: setup browser-packages
	$(PYTEST) tests/e2e $(PYTEST_ARGS)

test-slurm: setup slurm-packages
	$(PYTEST) tests/slurm $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# The docs site into site/ (mkdocs.yml): strict, so a broken link or anchor fails; its pictures come
# from two short training runs made during the build (about a minute on 2 cores).
docs: setup browser-packages
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

slurm-packages:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge iproute2 >/dev/null; }

browser-packages:
	@command -v chromium >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-dejavu-core >/dev/null; }
