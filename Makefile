# Every target installs what it needs itself: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: run test docs bench mutants lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev,docs,deploy]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) -e '.[dev,bench]'
	touch $@

$(VENV)/.installed-mutants: $(VENV)/.installed
	$(PIP) -e '.[dev,mutants]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/memrl demo

test: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks tools
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed-bench
	set -e; for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script; done

# Mutation testing of the math modules with their fast tests ([tool.mutmut] in pyproject.toml);
# not part of `make test`. A first run takes about 20 minutes on one core (4,400 mutants). mutmut
# keeps its results in mutants/ and keeps a verdict until the mutated function changes, so a later
# run tests the changed functions, then re-tests the earlier survivors (tests added since may kill
# them). Prints per module mutants, killed, survived; diffs in mutants/survivors.txt. Survivors
# judged equivalent by hand (`name: reason` lines in MUTANTS_EQUIVALENT) leave the survival rate.
# MUTANTS_JOBS: worker processes (default: the number of CPUs).
MUTANTS_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
MUTANTS_EQUIVALENT ?= tools/mutants_equivalent.txt
MUTMUT := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTANTS_JOBS)
mutants: $(VENV)/.installed-mutants
	mkdir -p mutants && $(PY) tools/mutants_report.py --names > mutants/.survivors-before
	$(MUTMUT)
	set -e; names=$$($(PY) tools/mutants_report.py --names --only-in mutants/.survivors-before); \
	if [ -n "$$names" ]; then \
		echo "re-testing $$(echo "$$names" | wc -l) earlier survivors (log: mutants/retest.log)"; \
		$(MUTMUT) $$names > mutants/retest.log 2>&1; \
	fi
	$(PY) tools/mutants_report.py $(if $(wildcard $(MUTANTS_EQUIVALENT)),--equivalent $(MUTANTS_EQUIVALENT))

format: $(VENV)/.installed
	$(PY) -m ruff format src tests benchmarks tools
	$(PY) -m ruff check --fix src tests benchmarks tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
