"""Benchmarks: each proves a claim against its baselines in one run and writes docs/results/.

One module per benchmark, each with a plain function that returns its rows and writes JSON +
markdown + plots (``bench_skip``, ``bench_flexi``, ``bench_compound``, ``bench_recipe``,
``bench_models``, ``bench_time``, ``bench_recommend``, ``bench_label_workers``, ``bench_serve``);
the ``stepsaver bench ...`` commands (:mod:`stepsaver.cli.bench`) call them. Benchmarks may use
every verb; no library package imports ``stepsaver.bench``.
"""
