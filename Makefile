# fenics-red: every target sets the environment up first when needed (scripts/setup is idempotent).
SHELL := /bin/bash
ENV := scripts/env
# Tests under MPI: one thread per rank, and a hard limit so that a hang fails instead of blocking.
MPI_TEST := OMP_NUM_THREADS=1 timeout 1500 $(ENV) mpirun -n 2 python -m pytest -q --color=no
# The serial session in TEST_WORKERS processes (pytest-xdist), one per core up to 4; 0 runs it in
# one process (make test TEST_WORKERS=0).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 2 ? 0 : (n > 4 ? 4 : n) )))
DEMO_OUT ?= demo-output
# make paper|denoiser|bench SIZE=small: the same pipeline at a tiny size (paper under a minute,
# denoiser about a minute, bench about three on 2 cores; the tests run them so); outputs in
# $(RUNS)/ (created when missing; small benchmark tables in $(RUNS)/bench/). SIZE, RUNS and DIM
# are taken from the command line only, never from the shell's environment (an exported DIM=3
# would retrain the 3-D model).
SIZE = full
RUNS = runs
DIM = 2
ifeq ($(filter full small,$(SIZE)),)
$(error SIZE must be full or small, got '$(SIZE)')
endif
SMALL := $(if $(filter small,$(SIZE)),1,0)
BENCH_OUT ?= $(if $(filter small,$(SIZE)),$(RUNS)/bench,benchmarks/results)

.PHONY: help setup lint test test-serial test-mpi demo bench paper denoiser meshes docker docker-offline \
	docker-check clean

help:
	@echo "make setup   provision the DOLFINx/PETSc/torch stack and .venv (idempotent)"
	@echo "make test    ruff check, then the tests serially and under mpirun -n 2"
	@echo "make demo    run the main job on the built-in phantom, results in $(DEMO_OUT)/"
	@echo "make bench   run the benchmarks, tables in benchmarks/results/"
	@echo "make paper   the paper's comparison on 24 held-out phantoms at 25/35/45 dB (runs/)"
	@echo "make denoiser  retrain the shipped denoiser with the project's pipeline (runs/)"
	@echo "  paper, denoiser, bench: SIZE=small runs them at a tiny size (minutes), RUNS=DIR for runs/"
	@echo "  denoiser DIM=3: the 3-D denoiser (fenics_red/data/denoiser-3d.pt): 16^3 volumes, then 24^3"
	@echo "make meshes  remake meshes/*.msh from meshes/*.geo with gmsh (*-3d.geo in 3-D)"
	@echo "make docker  build the Docker image fenics-red from debian:trixie (needs a Docker engine)"
	@echo "make docker-offline  the same FROM the root that make setup builds (no image registry)"
	@echo "make docker-check  build the image, run make demo and make test in it, compare with the host"

setup:
	@scripts/setup

test: lint test-serial test-mpi

lint: setup
	$(ENV) ruff check .

test-serial: setup
	$(ENV) python -m pytest -q --color=no -n $(TEST_WORKERS)

test-mpi: setup
	$(MPI_TEST)

demo: setup
	$(ENV) fenics-red demo --out $(DEMO_OUT)

bench: setup
	FENICS_RED_BENCH_SIZE=$(SIZE) FENICS_RED_BENCH_OUT=$(BENCH_OUT) \
	    FENICS_RED_BENCH_DATA=$(RUNS)/bench-data $(ENV) python benchmarks/run.py

paper: setup
	OMP_NUM_THREADS=1 FENICS_RED_DEMO_SMALL=$(SMALL) FENICS_RED_DEMO_OUT=$(RUNS) \
	    $(ENV) mpirun -n 2 python demos/paper_comparison.py

denoiser: setup
	SIZE=$(SIZE) DIM=$(DIM) scripts/train-denoiser $(RUNS)

# Each meshes/NAME.geo gives meshes/NAME.msh (gmsh -3 for NAME ending in -3d, else -2), written to
# a temporary file first so that a failed run never leaves a half-written .msh.
meshes: setup
	@set -e; for geo in meshes/*.geo; do \
	    msh="$${geo%.geo}.msh"; dim=2; \
	    case "$$geo" in (*-3d.geo) dim=3 ;; esac; \
	    echo "gmsh -$$dim $$geo -o $$msh"; \
	    rm -f "$$msh.tmp"; \
	    if $(ENV) gmsh -$$dim -format msh41 -v 2 "$$geo" -o "$$msh.tmp" && [ -s "$$msh.tmp" ]; then \
	        mv -f "$$msh.tmp" "$$msh"; \
	    else \
	        rm -f "$$msh.tmp"; echo "gmsh failed on $$geo" >&2; exit 1; \
	    fi; \
	done

docker:
	docker build -f docker/Dockerfile -t fenics-red .

# The setup's Debian 13 root imported as fenics-red-base:trixie, then the image FROM it.
docker-offline:
	scripts/docker-check --offline --build-only

# Minutes: not part of make test; run before a release and after changing docker/.
docker-check:
	scripts/docker-check

clean:
	rm -rf .venv build *.egg-info $(DEMO_OUT)
