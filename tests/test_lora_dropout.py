"""LoRA's input dropout on a CPU (modeling.LoraDropout): torch's dropout in distribution, the
dropped positions drawn directly. It drops p of the elements, scales the rest by 1 / (1 - p),
passes the gradient through the kept ones, follows the seed, and every LoRA layer of a run gets it."""

from __future__ import annotations

import pytest
import torch

from ftexp import modeling
from ftexp.modeling import LoraDropout, dropped_positions
from conftest import compose_cfg, tiny_setup


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.7])
def test_it_drops_p_of_the_elements_and_scales_the_rest(p):
    x = torch.full((2000, 1000), 3.0, requires_grad=True)
    y = LoraDropout(p).train()(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.002  # 2M elements: the binomial's standard deviation is under 0.0004
    assert torch.allclose(y[y != 0], torch.tensor(3.0 / (1 - p)))
    assert abs(y.mean().item() - 3.0) < 0.02  # the expectation is the input's, as with torch's dropout
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() / (1 - p))


def test_positions_are_dropped_independently_and_alike_everywhere():
    torch.manual_seed(0)
    mask = torch.zeros(4_000_000)
    mask[dropped_positions(mask.numel(), 0.05)] = 1
    assert abs(mask.mean().item() - 0.05) < 0.0006  # sd 0.00011
    assert abs((mask[:-1] * mask[1:]).mean().item() - 0.05**2) < 0.0002  # neighbours: p^2, sd 0.000025
    # the first and last positions, drawn 40,000 times over 100 elements: p each (sd 0.0011)
    small = torch.stack([torch.zeros(100).index_fill_(0, dropped_positions(100, 0.05), 1) for _ in range(40_000)])
    assert torch.allclose(small[:, [0, 1, 50, 98, 99]].mean(0), torch.tensor(0.05), atol=0.006)
    assert all(((pos >= 0) & (pos < 10)).all() for pos in (dropped_positions(10, 0.3) for _ in range(1000)))


@pytest.mark.timeout(120)  # a draw that restarts at 0 instead of where the last ended never passes n
def test_gaps_drawn_a_few_at_a_time_give_the_same_distribution():
    torch.manual_seed(0)  # 3 gaps a draw: n = 2,000 takes ~33 draws, each continuing where the last ended
    mask = torch.zeros(2000, 2000)
    for row in mask:
        row[dropped_positions(2000, 0.05, chunk=3)] = 1
    assert abs(mask.mean().item() - 0.05) < 0.0006  # 4M elements: sd 0.00011
    # every position, the last included, drops at p over the 2,000 draws (sd 0.0049)
    assert torch.allclose(mask.mean(0)[[0, 1, 999, 1998, 1999]], torch.tensor(0.05), atol=0.02)
    assert abs(mask[:, 1900:].mean().item() - 0.05) < 0.003


def test_masks_change_between_calls_follow_the_seed_and_vanish_in_eval():
    d = LoraDropout(0.1).train()
    x = torch.ones(64, 64)
    torch.manual_seed(0)
    first, second = d(x), d(x)
    torch.manual_seed(0)
    assert torch.equal(d(x), first) and not torch.equal(first, second)
    assert d.eval()(x) is x
    assert d.train()(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_a_probability_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="not in"):
        LoraDropout(1.0)


def test_every_lora_layer_of_a_run_gets_it(tmp_path):
    cfg = compose_cfg(["model=tiny", "lora=default", "lora.dropout=0.05"], tmp_path)
    _, _, model, _ = tiny_setup(cfg, tmp_path)
    model = modeling.attach_adapters(model, cfg.lora, cfg.quant)
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    dropouts = [d for m in layers for d in m.lora_dropout.values()]
    assert layers and all(isinstance(d, LoraDropout) and d.p == 0.05 for d in dropouts)
