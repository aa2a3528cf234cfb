"""LoRA's input dropout on a CPU (modeling.LoraDropout): torch's dropout in distribution, only
cheaper random bits. It drops p of the elements, scales the rest by 1 / (1 - p), passes the
gradient through the kept ones, follows the seed, and every LoRA layer of a run gets it."""

from __future__ import annotations

import pytest
import torch

from ftexp import modeling
from ftexp.modeling import LoraDropout
from conftest import compose_cfg, tiny_setup


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_it_drops_p_of_the_elements_and_scales_the_rest(p):
    x = torch.full((2000, 1000), 3.0, requires_grad=True)
    y = LoraDropout(p).train()(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.002  # 2M elements: the binomial's standard deviation is under 0.0004
    assert torch.allclose(y[y != 0], torch.tensor(3.0 / (1 - p)))
    assert abs(y.mean().item() - 3.0) < 0.02  # the expectation is the input's, as with torch's dropout
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() / (1 - p))


def test_every_lane_of_the_random_words_drops_alike():
    y = LoraDropout(0.05).train()(torch.ones(400_000, 4))
    for lane in range(4):  # four 16-bit numbers come from each 64-bit draw: none of them may be biased
        assert abs((y[:, lane] == 0).float().mean().item() - 0.05) < 0.003


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
