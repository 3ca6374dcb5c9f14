"""The Square query attack's plumbing (experiments/served_attacks/square_attack.py) against the real gateway with the
tiny test models: torchattacks queries the served defence through POST /classify, only scores come back, its
examples stay in the l_inf ball and on the 8-bit grid (so the PNGs carry them exactly), and every query is counted
and reaches the gateway. The figure itself is measured by the command (docs/results/served_attacks/)."""
from __future__ import annotations

import pytest
import torch

from experiments.served_attacks.common import EPS_LINF, GatewayClassifier, heldout
from experiments.served_attacks.square_attack import GatewayModel, square

pytest.importorskip("torchattacks")


def test_square_queries_the_gateway_and_stays_in_the_ball(gateway_factory):
    gw = gateway_factory()
    x, y, _ = heldout(4)
    before = gw.metrics().get('dbp_gateway_requests_total{endpoint="/classify",status="200"}', 0.0)
    client = GatewayClassifier(gw.url)
    try:
        model = GatewayModel(client)
        logp = model(x)
        assert logp.shape == (4, 10) and torch.allclose(logp.exp().sum(1), torch.ones(4), atol=1e-3)
        x_adv, used = square(model, x, y, n_queries=5)
    finally:
        client.close()
    assert (x_adv - x).abs().max() <= EPS_LINF + 1e-6
    assert torch.equal(torch.round(x_adv * 255) / 255, x_adv)
    assert model.calls >= 2 and model.queries >= 8  # the check above, Square's start, iterations on unfooled images
    assert ((1 <= used) & (used <= 6)).all() and model.queries == 4 + int(used.sum())
    after = gw.metrics()['dbp_gateway_requests_total{endpoint="/classify",status="200"}']
    assert after - before == model.calls
