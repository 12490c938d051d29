"""The smoothing-rate estimator r* against brute-force minima of ||d(r)|| over a grid of r."""
import json

import numpy as np
import pytest
import torch

from engine_helpers import make_config, memorized_model, tokenizer, unlearning_data
from sga.config import MethodConfig
from sga.engine.trainer import UnlearningTrainer
from sga.methods import build_objective
from sga.methods.rate import GradientStatistics, clip_rate, estimate_rate, optimal_rate


def _grid_argmin(norm_of, low=-6.0, high=6.0, coarse_points=49):
    """argmin of norm_of(r): a coarse grid, then a grid of step 0.005 around the coarse minimum."""
    coarse = np.linspace(low, high, coarse_points)
    step = coarse[1] - coarse[0]
    best = coarse[int(np.argmin([norm_of(r) for r in coarse]))]
    fine = np.linspace(best - step, best + step, int(round(2 * step / 0.005)) + 1)
    return fine[int(np.argmin([norm_of(r) for r in fine]))]


@pytest.mark.parametrize("reading, sign", [("sga", 1.0), ("sga_gls", -1.0)])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_closed_form_matches_grid_on_vectors(reading, sign, k):
    rng = np.random.default_rng(k)
    g_f, g_n = rng.normal(size=50), rng.normal(size=50) + 0.3 * rng.normal(size=50)
    stats = GradientStatistics(ff=g_f @ g_f, fn=g_f @ g_n, nn=g_n @ g_n, num_forget=1, num_normal=1)

    def norm_of(r):  # the update of the objective, written from its coefficients (objectives.py)
        return np.linalg.norm(-(1 - r + r / k) * g_f + sign * (r / k) * (k - 1) * g_n)

    assert optimal_rate(stats, k, reading) == pytest.approx(_grid_argmin(norm_of), abs=3e-3)  # grid step 0.005


@pytest.mark.parametrize("reading", ["sga", "sga_gls"])
def test_estimator_matches_brute_force_on_a_model(reading):
    """r* from the estimator vs the r whose actual SGA gradient (autograd through the objective) is smallest."""
    tok = tokenizer()
    model = memorized_model()
    k = 3
    data = unlearning_data(tok, num_classes=k)
    batches = [data.batch([0, 4], tok.pad_token_id), data.batch([7], tok.pad_token_id)]
    rate, stats = estimate_rate(model, batches, k, reading=reading, backend="torch")
    assert stats.num_forget == 3 and stats.num_normal == 3 * (k - 1)

    params = [p for p in model.parameters()]
    objective = build_objective(MethodConfig(name=reading, rate=0.0, num_classes=k), backend="torch")
    total = torch.tensor(3.0)
    model.eval()

    def norm_of(r):
        objective.rate = float(r)
        grads = [torch.zeros_like(p) for p in params]
        for batch in batches:
            loss = objective.compute(model, batch, total).loss
            for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc += g
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))

    brute = _grid_argmin(norm_of, -4.0, 4.0, coarse_points=33)
    assert rate == pytest.approx(brute, abs=3e-3), (rate, brute)


def test_degenerate_and_bad_inputs():
    zero = GradientStatistics(ff=1.0, fn=-1.0, nn=1.0, num_forget=1, num_normal=1)  # g_n = -g_f
    with pytest.raises(ValueError, match="undefined"):
        optimal_rate(zero, 2, "sga")
    with pytest.raises(ValueError, match="reading"):
        optimal_rate(zero, 2, "other")
    with pytest.raises(ValueError, match="K"):
        optimal_rate(zero, 1, "sga_gls")
    assert clip_rate(3.0, -1.0, 1.0) == 1.0 and clip_rate(-3.0, -1.0, 1.0) == -1.0 and clip_rate(0.2, -1, 1) == 0.2


def test_adaptive_rate_is_estimated_clipped_logged_and_used(tmp_path):
    tok = tokenizer()
    config = make_config(tmp_path, "sga", max_steps=4, adaptive_rate_every=2, rate_batches=1, rate_min=0.05, rate_max=0.2)
    data = unlearning_data(tok)
    result = UnlearningTrainer(memorized_model(), tok, data, config).train()
    events = [h for h in result.history if h.get("event") == "rate"]
    assert [e["step"] for e in events] == [0, 2]
    for event in events:
        assert event["rate"] == clip_rate(event["rate_estimate"], 0.05, 0.2)
    steps = [h for h in result.history if "loss" in h]
    assert [s["rate"] for s in steps] == [events[0]["rate"]] * 2 + [events[1]["rate"]] * 2
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l for l in logged if l.get("event") == "rate"] == events
