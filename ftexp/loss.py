"""The completion-only loss, with the output head run only where a label is read.

With completion-only loss most positions carry no label: an SST-2 row has ~57 tokens and
two labelled ones. The plain causal-LM path still projects every position onto the whole
vocabulary (SmolLM2's head is 21% of its weights; one batch's logits are ~180 MB), and
TRL's fused head scores every position too wherever Triton does not run (CPUs), where its
tiled log-softmax costs more than the plain path. ``CompletionLoss`` runs the model's own
forward with ``logits_to_keep`` set to the positions whose next token is a label in some
row of the batch (rows come length-grouped, so those positions cluster), then a
cross-entropy over the labelled ones. The head is the model's own module, so a LoRA
adapter on it trains, and model-specific head scaling still applies.

The loss is the same number as the plain path's: the sum over labelled tokens divided by
``num_items_in_batch`` (the labelled tokens of the whole accumulated step, as transformers'
Trainer counts them), scaled for token averaging across processes as the Trainer scales
its own loss.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ftexp import architecture

IGNORE = -100


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions (ascending) whose next token carries a label in any row of the batch."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


def completion_loss(model, inputs: dict, num_items_in_batch=None):
    """(sum of the labelled tokens' cross-entropy / their count, the model's outputs), the head
    run at ``labelled_positions`` only."""
    labels = inputs["labels"]
    keep = labelled_positions(labels)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**features, logits_to_keep=keep, use_cache=False)
    targets = labels[:, keep + 1]
    logits = outputs.logits
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    count = (targets != IGNORE).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device), outputs


def runs_on(model, device: str, head_adapter: bool) -> bool:
    """Whether ``CompletionLoss`` should compute this model's loss.

    Where TRL's fused head scores only labelled positions (Triton on CUDA) and the head has no
    adapter, TRL's own loss is as lean and never holds the logits, so it stays. A forward
    without ``logits_to_keep`` cannot choose positions: the trainer's own loss stays.
    """
    if not architecture.takes_logits_to_keep(model):
        return False
    return head_adapter or not device.startswith("cuda")


class CompletionLoss:
    """Trainer mixin: ``compute_loss`` through ``completion_loss`` while ``head_positions_only``."""

    head_positions_only = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.head_positions_only or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = completion_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # gradients are averaged over processes
        return (loss, outputs) if return_outputs else loss


@functools.cache
def with_completion_loss(trainer_class: type) -> type:
    """``trainer_class`` (TRL's SFTTrainer, transformers' Trainer) with ``CompletionLoss``'s compute_loss."""
    return type(trainer_class.__name__, (CompletionLoss, trainer_class), {})
