"""Reference implementations that ``benchmarks/tightness.py`` measures lipreg against.

Written independently of lipreg (numpy/scipy, and cvxpy for the SDP), so that agreement with
lipreg's certificates is evidence, not a tautology:

* :mod:`references.lipsdp_lmi` — the LipSDP-Neuron LMI of Fazlyab et al. (2019) for a dense
  chain with slope-restricted activations, the smallest ``ρ`` for given multipliers, and a
  float64 positive-definiteness test with an explicit rounding margin (Rump 2006) that turns
  any multipliers into a *verified* bound. No cvxpy.
* :mod:`references.lipsdp_cvxpy` — LipSDP-Neuron solved by cvxpy (Clarabel, else SCS), the
  solver's value and the verified one. Needs the optional ``bench`` extra.
* :mod:`references.eclipse_reference` — ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024)
  re-derived in numpy (not the PyPI ``eclipse-nn``, whose releases ≤ 0.1.5 are wrong on ≥ 2
  hidden layers).
* :mod:`references.dense_chain` — a ``nn.Sequential`` of Linear/Conv2d/ReLU/Flatten as a list
  of dense float64 matrices and activation slopes (what the references take).

Nothing in lipreg imports this package.
"""
