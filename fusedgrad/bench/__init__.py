"""The benchmark suites behind ``python -m fusedgrad bench`` (fusedgrad/cli/bench.py)
and ``benchmarks/``: not part of the library's API. The library never imports
this package; it imports the library (and nothing from fusedgrad.cli).

* ``native``   — the native ``Linear → Sigmoid → Linear`` reference model (``Net``)
* ``steps``    — one training step per route over the N×D→H→O grid (``--quick``, the default suite)
* ``rows``     — the N-scaling suite (``--rows``)
* ``ensemble`` — K models at once (``--ensemble``)
* ``training`` — whole training loops (``--training``)
"""
