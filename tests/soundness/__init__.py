"""Soundness harness: lipreg's certified bounds checked against an independent oracle.

``oracle.py`` computes certified *lower* bounds on the Lipschitz constant without any lipreg
code (float64 Jacobians, gradient ascent, difference quotients); ``generator.py`` builds
seeded random networks covering every rule family. A certified upper bound below a certified
lower bound is a soundness bug.
"""
