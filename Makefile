# dschat developer tasks. `make install && make test` works on a fresh machine without a GPU.
PYTHON ?= python3
# torch for machines without one installed and without a GPU: the CPU build. GPU users keep theirs.
TORCH_SPEC ?= torch==2.13.0
PYTEST ?= $(PYTHON) -m pytest

.PHONY: install test test-fast demo demo-screenshot help

help:
	@echo "make install    install dschat (editable) with test extras; keeps an installed torch"
	@echo "make test       the whole test suite (unit + integration on CPU), < 10 minutes"
	@echo "make test-fast  unit tests and quick integration tests only (skips 'slow')"
	@echo "make demo       the whole recipe on a tiny local model, on CPU, in a few minutes"
	@echo "make demo-screenshot  docs/images/demo-report.png: the demo's report.html in headless chromium"

install:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m pip install -e '.[dev]'; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch from PyPI (CUDA build)"; \
		$(PYTHON) -m pip install torch -e '.[dev]'; \
	else \
		echo "no torch and no GPU: installing $(TORCH_SPEC) (CPU)"; \
		$(PYTHON) -m pip install '$(TORCH_SPEC)' -e '.[dev]'; \
	fi

test:
	$(PYTEST) -q

test-fast:
	$(PYTEST) -q -m "not slow"

# The built-in demo: no download; output in ./dschat-demo (re-running skips finished steps).
demo:
	$(PYTHON) -m dschat_cli pipeline --demo --output-dir dschat-demo

# The README's picture of the demo's report (needs `make demo` first and a chromium binary).
CHROMIUM ?= chromium
demo-screenshot:
	@test -f dschat-demo/report.html || { echo "no dschat-demo/report.html: run make demo first"; exit 2; }
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2150 \
		--screenshot=docs/images/demo-report.png "file://$(CURDIR)/dschat-demo/report.html"
	$(PYTHON) -c "from PIL import Image; p = 'docs/images/demo-report.png'; \
		Image.open(p).convert('RGB').quantize(256).save(p, optimize=True)"  # ~2.5x smaller
