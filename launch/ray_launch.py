#!/usr/bin/env python
"""``diloco launch ray`` as a script, e.g. the entrypoint of ``ray job submit``.

    python launch/ray_launch.py --config configs/tiny_diloco_2x2_cpu.yaml --address local
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launch/ray_launch.py --config configs/tiny_diloco_2x2_cpu.yaml --address auto

Every argument is the same as for ``diloco launch ray`` (see docs/ray.md).
"""

import sys
from pathlib import Path

try:
    from diloco.cli import main
except ImportError:  # run from a checkout that is not installed (e.g. a job's working_dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diloco.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", "ray", *sys.argv[1:]]))
