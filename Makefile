# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test test-fast bench manifests readme clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q -c constraints.txt --no-deps tf2onnx  # pins protobuf 3.20; runs on 7
	# tf.keras 2.x, for the legacy SavedModel fixtures only; it requires `tensorflow`, we pin -cpu
	$(BIN)/pip install -q --no-deps -c constraints.txt tf_keras
	touch $(STAMP)

venv: $(STAMP)

# The HTML report test renders in headless Chromium: as root (CI) install Debian's package when it
# is missing; otherwise say how (the test skips locally, and fails under CI=true, without it).
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the HTML report test (apt-get)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
		echo "note: $(CHROMIUM) is missing, so the HTML report test will skip;" \
		     "install it with: sudo apt-get install -y chromium"; \
	fi

demo: $(STAMP)
	$(BIN)/python fixtures/demo.py

test: $(STAMP) browser
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# Issue 12's numbers side by side (minutes; fixtures built once under out/bench, ~3 GB): writes
# benchmarks/results.json and the tables of docs/benchmarks.md. The peer path needs onnx2torch.
bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	# byte-compile as an installed package is (PYTHONDONTWRITEBYTECODE would leave stale .pyc)
	$(BIN)/python -m compileall -q converter
	$(BIN)/python benchmarks/run.py --update-doc

manifests: $(STAMP)
	$(BIN)/python fixtures/gen_manifests.py

readme: $(STAMP)
	$(BIN)/python fixtures/gen_support_matrix.py

clean:
	rm -rf build *.egg-info .pytest_cache
