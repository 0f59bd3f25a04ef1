# The two commands the README opens with. Each creates .venv if missing and installs
# what it needs (pinned torch/torchvision from constraints.txt), then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export MPLBACKEND := Agg
export YOLO_OFFLINE := 1

.PHONY: test demo install lint clean bench

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps coco-froc-analysis==0.2.15
	@command -v dcm2niix >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q && apt-get install -y -q dcm2niix) >/dev/null 2>&1 \
	      || echo "warning: could not install dcm2niix; geometry tests will be skipped"; \
	  else echo "note: dcm2niix not found and apt-get unavailable; geometry tests will be skipped"; fi; }
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check welde_det tools tests bench
	$(PY) -m pytest -n 2 --dist loadfile -m "not gpu"

demo: $(STAMP)
	$(PY) -m welde_det.engine.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check welde_det tools tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
