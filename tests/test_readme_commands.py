"""Every command the README shows runs, at the smallest size that exercises it.

The README's shell blocks are read and compared with :data:`SHOWN` (each shown command and the
command line the test runs for it: the same command on files in a temporary folder, with sizes cut
down) and :data:`NOT_RUN` (with the reason), so that a new or changed command in the README fails
here until it is run too. ``make paper``, ``make denoiser`` and ``make bench`` run through their
size option (``SIZE=small``, outputs in ``RUNS``); ``make demo`` through ``DEMO_OUT`` (a
temporary folder, and ``--grid 12 --max-steps 5``). Make runs with ``-o setup``: the tests
already run in the environment that ``make setup`` provides. The commands start child
processes (some their own ``mpirun``), so they run in the serial session only.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

#: Each command shown in the README's shell blocks -> what the test runs ({tmp}: its folder).
#: Options in brackets in the README are optional: the test passes them, at small values.
SHOWN = {
    # Two commands, and scripts/env
    "make demo": "make -o setup demo 'DEMO_OUT={tmp}/demo --grid 12 --max-steps 5 --quiet'",
    "scripts/env fenics-red --help": "scripts/env fenics-red --help",
    "scripts/env mpirun -n 2 fenics-red forward --modulus E.npy --out u.npz":
        "scripts/env mpirun -n 2 fenics-red forward --modulus {tmp}/E.npy --out {tmp}/u.npz",
    "scripts/env python -m pytest tests/test_forward.py":
        "scripts/env python -m pytest -q tests/test_forward.py",
    # fenics-red forward
    "scripts/env fenics-red forward --modulus E.npy --out u.npz [--width W --height H --nu 0.495 "
    "--plane-strain --traction P --support fixed|sliding --solver lu|gamg] "
    "[--volumetric auto|nodal|element]":
        "scripts/env fenics-red forward --modulus {tmp}/E.npy --out {tmp}/u2.npz --width 2 "
        "--height 1.5 --nu 0.495 --plane-strain --traction 0.2 --support sliding --solver gamg "
        "--volumetric nodal",
    "scripts/env mpirun -n 2 fenics-red forward --mesh meshes/roi-2d.msh --modulus VALUES.npy "
    "--out u.npz":
        "scripts/env mpirun -n 2 fenics-red forward --mesh meshes/roi-2d.msh --modulus "
        "{tmp}/VALUES.npy --out {tmp}/u-mesh.npz",
    # Synthetic data
    "scripts/env fenics-red simulate --samples 540 --grid 64 --snr 35 --seed 1 --out train.h5 "
    "[--grid-y NY --noise-ratio 1 --force-noise 0 --masks DIR --inclusions 1 4 --soft-edge 0 ...]":
        "scripts/env fenics-red simulate --samples 4 --grid 12 --snr 35 --seed 1 --out "
        "{tmp}/train.h5 --quiet",
    "scripts/env fenics-red simulate --samples 24 --grid 64 --snr 35 --family rings --out "
    "rings.h5":
        "scripts/env fenics-red simulate --samples 2 --grid 16 --snr 35 --family rings --out "
        "{tmp}/rings.h5 --quiet",
    "scripts/env mpirun -n 2 fenics-red simulate ...":
        "scripts/env mpirun -n 2 fenics-red simulate --samples 4 --grid 12 --grid-y 12 --snr 25 "
        "--seed 2 --noise-ratio 1 --force-noise 0 --inclusions 1 2 --soft-edge 0.5 "
        "--out {tmp}/test.h5 --quiet",
    "scripts/env fenics-red show train.h5 --sample 0 --out sample0.png":
        "scripts/env fenics-red show {tmp}/train.h5 --sample 0 --out {tmp}/sample0.png",
    # On a mesh
    "scripts/env mpirun -n 2 fenics-red simulate --mesh meshes/roi-2d.msh --samples 24 --snr 35 "
    "--out roi.h5 [--pixel MM]":
        "scripts/env mpirun -n 2 fenics-red simulate --mesh meshes/roi-2d.msh --samples 1 "
        "--snr 35 --out {tmp}/roi.h5 --pixel 2 --quiet",
    "scripts/env mpirun -n 2 fenics-red evaluate roi.h5 --out roi-evaluation --xdmf":
        "scripts/env mpirun -n 2 fenics-red evaluate {tmp}/roi.h5 --out {tmp}/roi-evaluation "
        "--xdmf --quiet --methods ml,denoised-ml --pixel 2",
    # Reconstruction
    "scripts/env fenics-red reconstruct DATA.h5 --method ml --all --out ml.h5":
        "scripts/env fenics-red reconstruct {tmp}/train.h5 --method ml --all --out {tmp}/ml.h5 "
        "--quiet",
    "scripts/env mpirun -n 2 fenics-red reconstruct DATA.h5 --method red --sample 3 --out red3.h5":
        "scripts/env mpirun -n 2 fenics-red reconstruct {tmp}/train.h5 --method red --sample 3 "
        "--out {tmp}/red3.h5 --max-steps 5 --quiet",
    "scripts/env fenics-red evaluate DATA.h5 --methods gn-tikhonov,gn-tv,ml,denoised-ml,red "
    "--out eval/":
        "scripts/env fenics-red evaluate {tmp}/train.h5 --methods "
        "gn-tikhonov,gn-tv,ml,denoised-ml,red --out {tmp}/eval/ --first 2 --figures 1 "
        "--max-steps 5 --quiet",
    # Training
    "scripts/env fenics-red reconstruct train.h5 --method ml --all --out pairs.h5":
        "scripts/env fenics-red reconstruct {tmp}/train.h5 --method ml --all --out "
        "{tmp}/pairs.h5 --quiet",
    "scripts/env fenics-red train --data pairs.h5 --out model.pt [--epochs 150 --device auto ...]":
        "scripts/env fenics-red train --data {tmp}/pairs.h5 --out {tmp}/model.pt --epochs 1 "
        "--device auto --channels 4 --depth 2 --quiet",
    "scripts/env fenics-red train --data pairs-35db.h5 pairs-25db.h5 --out mixed.pt":
        "scripts/env fenics-red train --data {tmp}/pairs.h5 {tmp}/pairs-25db.h5 --out "
        "{tmp}/mixed.pt --epochs 1 --channels 4 --depth 2 --quiet",
    "scripts/env fenics-red train --data more-pairs.h5 --out tuned.pt --init model.pt --lr 3e-4":
        "scripts/env fenics-red train --data {tmp}/pairs-25db.h5 --out {tmp}/tuned.pt --init "
        "{tmp}/model.pt --lr 3e-4 --epochs 1 --channels 4 --depth 2 --quiet",
    "scripts/env fenics-red reconstruct test.h5 --method red --all --out red.h5 "
    "--denoiser model.pt":
        "scripts/env fenics-red reconstruct {tmp}/test.h5 --method red --all --out {tmp}/red.h5 "
        "--denoiser {tmp}/model.pt --max-steps 5 --quiet",
    # uncertainty maps
    "scripts/env fenics-red reconstruct test.h5 --method gn-tikhonov --sample 0 --uncertainty "
    "--out gn-std.h5":
        "scripts/env fenics-red reconstruct {tmp}/test.h5 --method gn-tikhonov --sample 0 "
        "--uncertainty --uncertainty-rank 20 --out {tmp}/gn-std.h5 --quiet",
    # 3-D volumes
    "scripts/env mpirun -n 2 fenics-red simulate --samples 4 --grid 24 --grid-z 24 --seed 41 "
    "--out box.h5":
        "scripts/env mpirun -n 2 fenics-red simulate --samples 2 --grid 10 --grid-z 10 --seed 41 "
        "--out {tmp}/box.h5 --quiet",
    "scripts/env mpirun -n 2 fenics-red evaluate box.h5 --methods ml,gn-tv,red --out "
    "box-evaluation":
        "scripts/env mpirun -n 2 fenics-red evaluate {tmp}/box.h5 --methods ml,gn-tv,red --out "
        "{tmp}/box-evaluation --max-steps 5 --quiet",
    "scripts/env mpirun -n 2 fenics-red reconstruct box.h5 --method red --all --out "
    "red-slices.h5 --denoiser fenics_red/data/denoiser.pt":
        "scripts/env mpirun -n 2 fenics-red reconstruct {tmp}/box.h5 --method red --all --out "
        "{tmp}/red-slices.h5 --denoiser fenics_red/data/denoiser.pt --max-steps 5 --quiet",
    "scripts/env fenics-red simulate --mesh meshes/box-3d.msh --samples 2 --seed 4 --out "
    "box-mesh.h5":
        "scripts/env fenics-red simulate --mesh meshes/box-3d.msh --samples 1 --seed 4 --out "
        "{tmp}/box-mesh.h5 --quiet",
    "scripts/env mpirun -n 2 fenics-red evaluate box-mesh.h5 --methods ml,red --out "
    "box-mesh-evaluation":
        "scripts/env mpirun -n 2 fenics-red evaluate {tmp}/box-mesh.h5 --methods ml,red --out "
        "{tmp}/box-mesh-evaluation --max-steps 5 --quiet",
    # Your own measurements
    "scripts/env fenics-red import measurement.mat --out data.h5 --displacement u --interleaved "
    "--length-unit m --displacement-unit m --traction 100 --modulus-unit kPa":
        "scripts/env fenics-red import {tmp}/own-data/measurement.mat --out {tmp}/data.h5 "
        "--displacement u --interleaved --length-unit m --displacement-unit m --traction 100 "
        "--modulus-unit kPa",
    "scripts/env fenics-red reconstruct data.h5 --sample 0 --method red --out estimate.h5":
        "scripts/env fenics-red reconstruct {tmp}/data.h5 --sample 0 --method red --out "
        "{tmp}/estimate.h5 --max-steps 5 --quiet",
}

#: Commands shown in the README that this test does not run, and why.
NOT_RUN = {
    "scripts/env python demos/own_data.py": "tests/test_demos.py runs it at a small size",
    "python3 -m fenics_red.cli.train --data pairs.h5 --out model.pt --device cuda":
        "tests/test_training.py runs it with FEniCSx and MPI made unimportable (no GPU here)",
    "make test": "it runs this test (it would recurse)",
}

#: Commands of the Docker image (``docker ...``, ``make docker...``) need a Docker engine:
#: ``make docker-check`` builds the image and runs ``make demo`` and ``make test`` in it.
DOCKER = re.compile(r"^(docker |make docker)")

#: ``make`` targets named in the README's text, run here (at a small size) or not, and why.
MAKE_TARGETS = {"demo": "run", "test": "recursion", "setup": "the tests run in its environment",
                "paper": "run", "bench": "run", "denoiser": "run",
                "meshes": "rewrites the shipped meshes/*.msh (gmsh; tests/test_meshes.py checks "
                          "the meshes)",
                "docker": "needs a Docker engine", "docker-offline": "needs a Docker engine",
                "docker-check": "needs a Docker engine"}


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's ``bash`` blocks: continuation lines joined, comments and
    blank lines dropped, runs of spaces made one."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+", " ", re.sub(r"(^|\s)#.*$", "", line)).strip()
            if command:
                commands.append(command)
    return commands


def readme_python() -> str:
    """The README's one Python block."""
    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return snippet


# -- the list is the README's ---------------------------------------------------------------------

def test_the_readme_shows_exactly_the_commands_this_test_runs_or_says_why_not():
    shown = readme_commands()
    assert len(shown) == len(set(shown)), "a command is shown twice"
    known = set(SHOWN) | set(NOT_RUN)
    assert not any(DOCKER.match(c) for c in known)
    shown = {c for c in shown if not DOCKER.match(c)}
    assert shown == known, (f"new in the README: {sorted(shown - known)}; "
                            f"no longer in the README: {sorted(known - shown)}")
    named = set(re.findall(r"(?:`|^)make ([a-z][a-z-]*)", README.read_text(), re.M))
    assert named <= set(MAKE_TARGETS), f"make targets without a test: {named - set(MAKE_TARGETS)}"
    makefile = (REPO / "Makefile").read_text()
    for target in MAKE_TARGETS:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no target {target}"


def test_readme_commands_are_read_from_its_bash_blocks():
    text = ("x\n```bash\nmake a    # first\nscripts/env b --x 1 \\\n    --y 2\n\n# only a note\n"
            "```\n```python\nprint(1)\n```\n")
    assert readme_commands(text) == ["make a", "scripts/env b --x 1 --y 2"]


# -- running them ---------------------------------------------------------------------------------

#: Settings of scripts/env for mpirun (root, shared memory), kept for a child's own mpirun.
_MPI_SETTINGS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "OMPI_MCA_btl",
                 "OMPI_MCA_rmaps_base_oversubscribe", "OMPI_MCA_mpi_yield_when_idle",
                 "PRTE_MCA_rmaps_default_mapping_policy")


def _env(**extra) -> dict:
    """The environment of a child command (not a rank of this test's MPI job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PRTE_")) or k in _MPI_SETTINGS}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run(command: str, tmp: Path, timeout: float = 300) -> str:
    """Run ``command`` (a line of :data:`SHOWN`, or one like it) from the repository's root, with
    ``{tmp}`` replaced and leading ``NAME=value`` words as environment; returns its output."""
    words = shlex.split(command.format(tmp=tmp))
    extra = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        extra[name] = value
    done = subprocess.run(words, cwd=REPO, env=_env(**extra), capture_output=True, text=True,
                          timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command!r} failed ({done.returncode}):\n{output[-3000:]}"
    return output


def shown(command: str, tmp: Path, timeout: float = 300) -> str:
    return run(SHOWN[command], tmp, timeout)


@pytest.fixture
def tmp(one_process):
    path = Path(tempfile.mkdtemp(prefix="fenics-red-readme-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


@pytest.mark.slow
def test_make_paper_bench_and_denoiser_run_at_the_small_size_into_a_new_folder(tmp):
    pytest.importorskip("torch")
    if shutil.which("make") is None:
        pytest.skip("no make")
    runs = tmp / "new" / "runs"  # a fresh clone has no runs/ folder: the targets make it
    shipped = REPO / "fenics_red" / "data" / "denoiser.pt"
    shipped_3d = REPO / "fenics_red" / "data" / "denoiser-3d.pt"
    tables = sorted((REPO / "benchmarks" / "results").glob("*"))
    before = {p: _digest(p) for p in [shipped, shipped_3d, *tables]}
    out = run(f"make -o setup paper SIZE=small RUNS={runs}", tmp)
    assert "| 35 dB |" in out and (runs / "paper-tables.md").exists()
    run(f"make -o setup denoiser SIZE=small RUNS={runs}", tmp)
    from fenics_red.denoiser import Denoiser

    model = Denoiser.load(runs / "installed" / "denoiser.pt")  # a toy: never into the package
    assert model.card["epochs"] == 1
    # the second stage, fine-tuned from the first stage's model on the four training families
    assert model.card["init"]["path"] == str((runs / "denoiser-small.pt").resolve())
    assert model.card["data"]["pairs"] == 16
    run(f"make -o setup denoiser SIZE=small DIM=3 RUNS={runs}", tmp)
    model = Denoiser.load(runs / "installed" / "denoiser-3d.pt")
    assert model.dims == 3 and model.card["epochs"] == 1
    # 3-D stage 2: fine-tuned from stage 1's model on volumes of the finer grid
    assert model.card["init"]["path"] == str((runs / "denoiser-3d-small.pt").resolve())
    assert model.card["data"]["image_shape"] == [11, 11, 11]
    out = run(f"make -o setup bench SIZE=small RUNS={runs}", tmp)
    for name in ("forward", "inverse", "mesh", "red", "simulate"):
        assert (runs / "bench" / f"{name}.md").exists(), out
    assert {p: _digest(p) for p in before} == before  # the shipped model and tables unchanged


def test_make_denoiser_refuses_a_kept_data_set_of_another_size(tmp):
    """A finished data set is never simulated again: one of 3 phantoms where 8 are asked for stops
    the run before any work, instead of training on fewer pairs than the recipe says."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    runs = tmp / "runs"
    runs.mkdir()
    run(f"scripts/env fenics-red simulate --samples 3 --grid 16 --snr 35 --seed 1 --quiet "
        f"--out {runs / 'train-16-small-35db.h5'}", tmp)
    done = subprocess.run(["make", "-o", "setup", "denoiser", "SIZE=small", f"RUNS={runs}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "holds 3 phantoms, but 8 are asked for" in done.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["train-16-small-35db.h5"]


def test_make_paper_refuses_an_unknown_size(tmp):
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-o", "setup", "paper", "SIZE=huge"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "SIZE must be full or small" in done.stderr


@pytest.mark.slow
def test_make_demo(tmp):
    pytest.importorskip("torch")
    if shutil.which("make") is None:
        pytest.skip("no make")
    shown("make demo", tmp)
    assert (tmp / "demo" / "results" / "summary.md").exists()


@pytest.mark.slow
def test_help_the_test_example_and_forward(tmp):
    assert "simulate" in shown("scripts/env fenics-red --help", tmp)
    assert "passed" in shown("scripts/env python -m pytest tests/test_forward.py", tmp)
    np.save(tmp / "E.npy", np.full((9, 11), 0.2))
    lines = [c for c in SHOWN if "fenics-red forward" in c]
    for command in lines[:2]:
        shown(command, tmp)
    with np.load(tmp / "u.npz") as u, np.load(tmp / "u2.npz") as u2:
        assert u["uy"].shape == u2["uy"].shape == (9, 11)
    # one value per node of the mesh, in its file's order (gmsh 4.1: the $Nodes header)
    text = (REPO / "meshes" / "roi-2d.msh").read_text()
    nodes = int(text.split("$Nodes\n", 1)[1].split()[1])
    np.save(tmp / "VALUES.npy", np.full(nodes, 0.2))
    shown(lines[2], tmp)
    with np.load(tmp / "u-mesh.npz") as u:
        assert u["ux"].shape == (nodes,)


def test_the_python_example(tmp):
    (tmp / "example.py").write_text(readme_python())
    run(f"scripts/env python {tmp}/example.py", tmp)


@pytest.mark.slow
def test_simulate_show_reconstruct_evaluate_and_train(tmp):
    pytest.importorskip("torch")
    for command in SHOWN:
        if (re.search(r"fenics-red (simulate|show) ", command) and "--mesh" not in command
                and "box.h5" not in command):
            shown(command, tmp)
    assert (tmp / "sample0.png").stat().st_size > 1000
    for command in SHOWN:
        if "DATA.h5" in command:
            shown(command, tmp)
    assert (tmp / "eval" / "summary.md").exists()
    shown("scripts/env fenics-red reconstruct train.h5 --method ml --all --out pairs.h5", tmp)
    run("scripts/env fenics-red reconstruct {tmp}/test.h5 --method ml --all --out "
        "{tmp}/pairs-25db.h5 --quiet", tmp)
    for command in SHOWN:
        if ("fenics-red train" in command or "--denoiser" in command) and "box" not in command:
            shown(command, tmp)
    assert {p.name for p in tmp.glob("*.pt")} >= {"model.pt", "mixed.pt", "tuned.pt"}
    assert (tmp / "red.h5").exists()
    shown("scripts/env fenics-red reconstruct test.h5 --method gn-tikhonov --sample 0 "
          "--uncertainty --out gn-std.h5", tmp)
    from fenics_red.reconstruction import load_std

    assert load_std(tmp / "gn-std.h5").shape[0] == 1


@pytest.mark.slow
def test_3d_volumes(tmp):
    pytest.importorskip("torch")
    for command in SHOWN:  # simulate, evaluate with the 3-D model, RED slice by slice
        if "box.h5" in command:
            shown(command, tmp)
    assert "x 10" in (tmp / "box-evaluation" / "summary.md").read_text()
    assert (tmp / "red-slices.h5").exists()
    for command in SHOWN:  # the same on a 3-D gmsh mesh
        if "box-mesh.h5" in command:
            shown(command, tmp)
    assert (tmp / "box-mesh-evaluation" / "summary.md").exists()


@pytest.mark.slow
def test_on_a_mesh(tmp):
    pytest.importorskip("torch")
    for command in SHOWN:
        if "roi.h5" in command:
            shown(command, tmp)
    assert (tmp / "roi-evaluation" / "summary.md").exists()


MAKE_MEASUREMENT = """
import sys

import numpy as np
import scipy.io

from fenics_red.data import mesh_settings, simulate_sample
from fenics_red.domain import MeshArrays
from fenics_red.raster import ImageGrid

mesh = MeshArrays.of_grid(ImageGrid(12, 9, 40.0, 30.0))
sample = simulate_sample(0, mesh_settings(mesh, snr_db=35.0, seed=2026))
scipy.io.savemat(sys.argv[1], {
    "nodes": mesh.points * 1e-3, "elements": mesh.cells + 1,
    "u": np.column_stack([sample.ux_noisy, sample.uy_noisy]).ravel() * 1e-3})
"""


@pytest.mark.slow
def test_own_measurements(tmp):
    """The walk-through's file (demos/own_data.py at its small size): a phantom on a grid mesh at
    35 dB in m, 1-based cells, the displacement interleaved."""
    pytest.importorskip("torch")
    (tmp / "own-data").mkdir()
    (tmp / "make_measurement.py").write_text(MAKE_MEASUREMENT)  # in a child: rank 0 only
    run(f"scripts/env python {tmp}/make_measurement.py {tmp}/own-data/measurement.mat", tmp)
    for command in SHOWN:
        if "data.h5" in command:
            shown(command, tmp)
    assert (tmp / "estimate-modulus.mat").exists()
