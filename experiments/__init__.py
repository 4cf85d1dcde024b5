"""The Hydra experiments of lipreg (an installed package: ``pip install -e ".[experiments]"``).

``train.py`` is the entry point (``python experiments/train.py ...`` or
``python -m experiments.train ...``); ``run.py`` builds and fits one configuration (resume
with ``ckpt_path=``); ``bounds.py`` computes every final bound; ``studies/`` holds the paper's
studies; ``data/``, ``models.py``, ``lit_module.py`` and ``loggers.py`` are what the configs
in ``conf/`` instantiate. The configs are read from the checkout, hence the editable install.
"""
