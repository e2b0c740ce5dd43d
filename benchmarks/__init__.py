"""The checkout's benchmark folder: ``results/`` (the committed results the README's tables
are rendered from, with device, versions and commit on every row), ``gpu_session.sh`` (the
runbook for a lent GPU) and the pytest-benchmark suites over the cases of ``lori.bench``:

    lori bench [--suite kernels|memory|storage|all] [--quick] [--results DIR]   # CSV + JSON + PNG
    pytest benchmarks/ --benchmark-only                                        # pytest-benchmark

The suites themselves ship in the package (``lori.bench``), so ``lori bench`` also runs
from a plain ``pip install``; pyproject's ``testpaths`` keeps a plain ``pytest`` from
collecting this folder.
"""
