"""The paper's studies (Scaman & Virmaux, NeurIPS 2018), each a Hydra experiment.

    python experiments/train.py experiment=paper_mlp logger=csv      # §3.2, trained MLPs
    python experiments/train.py experiment=paper_cnn logger=csv      # §3.3, CNNs (digits)
    python experiments/train.py experiment=paper_alexnet             # §3.4, bounds only
    python experiments/train.py experiment=paper_random              # §3.1, ideal scenario
    python experiments/train.py experiment=penalty_sweep logger=csv  # accuracy vs bound
    python experiments/train.py experiment=penalty_sweep_mlp         # SeqLip penalty, MLP
    ... study.quick=true                                             # a smoke test, seconds

**Where the outputs go.** A study writes into its Hydra run directory (``paths.output_dir``,
``outputs/<date>/<time>/``): ``table.md`` (a narrow main table: network, certified AutoLip,
SeqLip, lower bound, ratio, the paper's values), ``table.csv`` (every column), PNG plots,
``curves.csv`` for training studies (the bounds :class:`lipreg.LipschitzCallback` recorded),
``weights/<run>.pt``, and last ``study.json`` (the manifest: the run finished). It never
writes to the committed ``results/``. Updating ``results/<study>/`` is an explicit step::

    python -m experiments.studies.publish outputs/<date>/<time>      # or: ... study.publish=true

which replaces each table and plot atomically (see :mod:`experiments.studies.publish`).

**Every number is labelled**: certified upper bounds (AutoLip with certified layer norms,
exact SeqLip, the Frobenius product), estimates (greedy SeqLip, top-k truncation, AutoLip with
Lanczos norms) and certified lower bounds (largest local Jacobian norm found). Rows say when
the data stand in for the paper's (digits for MNIST) and when the weights are random.

**Layout.**

* :mod:`~experiments.studies.driver`: the ``@study`` decorator, the one training loop
  (:func:`~experiments.studies.driver.train_runs`: fit through ``experiments.train.build``,
  measure, log, rewrite the outputs) and :func:`~experiments.studies.driver.finish_study`;
* :mod:`~experiments.studies.measure`: every bound of one network, with timings;
* :mod:`~experiments.studies.paper_values`: the paper's numbers, once;
* :mod:`experiments.reporting`: tables (Markdown + CSV) and plots, written atomically;
* one module per study, whose ``run`` the experiment config names.

**Adding a study** = one file and one config:

1. ``experiments/studies/my_study.py`` with a ``@study``-decorated
   ``run(cfg, *, <parameters>, quick: bool = False) -> dict[str, float]``. A training study
   builds one :class:`~experiments.studies.driver.RunSpec` per run (``run_cfg(cfg, name,
   updates)``) and calls ``train_runs(cfg, runs, evaluate, write)``: ``evaluate(fit, spec)``
   returns the run's table row and final values (use
   :func:`~experiments.studies.measure.network_bounds`), ``write(out, rows, fits)`` writes
   its tables (:func:`experiments.reporting.write_table` with ``main_columns``) and plots. A
   study without training computes its rows and ends with ``finish_study(cfg, rows, summary)``.
2. ``conf/experiment/my_study.yaml`` (``# @package _global_``) with ``task_name: my_study``
   and ``study: {_target_: experiments.studies.my_study.run, _partial_: true, ...}``.
   ``tests/test_studies.py`` then composes it and checks every parameter exists.
"""
