"""The roofline model of every backend's kernel plan, from a checkout: a thin entry to the
suite that ships in the package (``lori/bench/roofline.py``).

    .venv/bin/python -m benchmarks.roofline           # = lori bench --suite roofline (any lori bench option)
    .venv/bin/python -m lori.bench.roofline DIR       # the model beside a GPU run's DIR/kernels_cuda.csv
"""

import sys

from lori.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--suite", "roofline", *sys.argv[1:]]))
