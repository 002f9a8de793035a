"""``make bench``: hiftune side by side with the fine-tuning methods users would pick instead.

Every method comes from its own pinned PyPI package (``benchmarks/requirements-bench.txt``) and is
driven the way its authors document; this package only builds the model, feeds batches and
measures. Modules:

* :mod:`bench.methods`: the configurations measured (method, package, precision, options).
* :mod:`bench.adapters`: one module per method family, each turning a model into a training step.
* :mod:`bench.worker`: measures one configuration (peak memory, step times) in its own process.
* :mod:`bench.runner`: runs every configuration back to back, each in a fresh worker process.
* :mod:`bench.quality`: the sentiment task with each method; accuracy and accuracy vs wall time.
* :mod:`bench.scale`: predicted memory at 7B/8B scale from each method's own formula.
* :mod:`bench.report`: tables, plots and ``docs/benchmarks.md``.

Run it with ``make bench`` or ``make bench-quick`` (see ``python -m bench --help`` with
``PYTHONPATH=benchmarks``).
"""
