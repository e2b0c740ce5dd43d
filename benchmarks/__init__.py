"""LoRI's benchmark suites: kernels (speed), memory and storage, each against PEFT LoRA and
the original LoRI code, with device, versions and commit on every row.

    lori bench [--suite kernels|memory|storage|all] [--quick] [--results DIR]   # CSV + JSON + PNG
    python -m lori.bench ...                                                   # the same
    pytest benchmarks/ --benchmark-only                                        # pytest-benchmark

Modules: ``common`` (environment, timing, results files), ``kernels``, ``memory``,
``storage`` (one ``run(device, quick=, full=, backends=) -> {table: rows}`` each) and
``report`` (markdown tables and PNG plots from the results files). ``test_*.py`` are the
pytest-benchmark suites; pyproject's ``testpaths`` keeps a plain ``pytest`` from
collecting them.
"""
