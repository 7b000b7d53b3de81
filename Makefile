# Two commands do everything on a fresh machine:
#   make demo   set up, then run the whole pipeline on the embedded default
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SLIDE := data/cache/cmu_small_region.svs

.PHONY: setup demo test fuzz bench browser-deps clean

setup: $(STAMP) $(SLIDE)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

$(SLIDE): | $(STAMP)
	$(PY) -m mitosis_ldm.sample --out $(SLIDE)

# The report's browser test drives Debian's Chromium; install it once if missing.
browser-deps:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { echo "installing chromium + chromium-driver for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "warning: could not install chromium; the browser test will be skipped"; }

demo: setup
	$(PY) -m mitosis_ldm.demo

test: setup browser-deps
	$(PY) -m pytest -q

# The fuzz tests with a large budget and a fresh random seed (CI runs them derandomised with small budgets).
FUZZ_CASES ?= 500
fuzz: setup
	MITOSIS_LDM_FUZZ=$(FUZZ_CASES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_serve_fuzz.py

# The speed and cost benches, on the demo's trained models (run `make demo` first); each prints JSON, kept in
# runs/bench/NAME.json. The quality studies take arguments and tens of minutes each: see their docstrings and docs/.
BENCH_DEMO := demo_budget transition_speed score_speed autoencoder_throughput posterior_speed synth_speed serve_latency
bench: setup
	@test -f runs/demo/diffusion/model/pipeline.json -a -f runs/demo/classifier/model/config.json || \
	  { echo "make bench: runs/demo has no trained pipeline and classifier; run make demo first"; exit 2; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	mkdir -p runs/bench
	for name in $(BENCH_DEMO); do \
	  echo "bench/$$name.py -> runs/bench/$$name.json"; \
	  $(PY) bench/$$name.py > runs/bench/$$name.json.tmp && $(PY) -m json.tool runs/bench/$$name.json.tmp >/dev/null && \
	    mv runs/bench/$$name.json.tmp runs/bench/$$name.json || \
	  { rm -f runs/bench/$$name.json.tmp; exit 1; }; \
	done

clean:
	rm -rf runs
