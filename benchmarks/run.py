"""Run every benchmark serially and on 2 ranks; tables land in benchmarks/results/*.md.

    make bench                     # all of them
    make bench SIZE=small          # all of them at a tiny size (seconds), tables in runs/bench/
    scripts/env python benchmarks/run.py forward inverse
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALL = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run", "common"))


def main(names):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            sys.exit(f"[bench] no benchmark benchmarks/{name}.py; choose from {ALL}")
        for command in ([sys.executable, str(script)],
                        ["mpirun", "-n", "2", sys.executable, str(script)]):
            print(f"[bench] {' '.join(command[-3:])}", flush=True)
            subprocess.run(command, check=True, env=env)
    sys.path.insert(0, str(HERE))
    from common import RESULTS

    print(f"[bench] tables in {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:] or ALL)
