"""Run every benchmark serially and on 2 ranks; tables land in benchmarks/results/*.md.

    make bench                     # all of them
    make bench SIZE=small          # all of them at a tiny size (minutes), tables in runs/bench/
    scripts/env python benchmarks/run.py forward inverse
    scripts/env python benchmarks/run.py forward3d --ranks 2   # only the 2-rank rows (rerun)
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run", "common"))


def main(names, ranks=(1, 2)):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            sys.exit(f"[bench] no benchmark benchmarks/{name}.py; choose from {ALL}")
        for n in ranks:
            command = [sys.executable, str(script)]
            if n > 1:
                command = ["mpirun", "-n", str(n), *command]
            print(f"[bench] {' '.join(command[-3:])}", flush=True)
            subprocess.run(command, check=True, env=env)
    sys.path.insert(0, str(HERE))
    from common import RESULTS

    print(f"[bench] tables in {RESULTS}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run benchmarks on 1 and 2 ranks.")
    parser.add_argument("names", nargs="*", help=f"benchmarks (default all: {ALL})")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                        help="rank counts to run (default 1 2)")
    args = parser.parse_args()
    main(args.names or ALL, args.ranks)
