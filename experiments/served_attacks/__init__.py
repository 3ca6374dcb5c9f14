"""Attacks on what is served (issue 20): the real tritonserver and the real gateway, over gRPC and HTTP.

  python -m experiments.served_attacks.seed_attack    # DW-box examples for a seed's noise: raw seed vs the gateway
  python -m experiments.served_attacks.square_attack  # Square (torchattacks), score-based, through /classify

Shared pieces (held-out images, the stack, the three ways to ask for labels) are in `common.py`; the attack
math is dbp's (`dbp.attacks`, `dbp.serving.services`), never restated here.
"""
