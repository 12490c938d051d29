"""``sft``: supervised fine-tuning through the unlearning trainer.

Not an unlearning method: it is registered beside them so the same trainer (checkpoints, progress, exact resume)
runs it, to teach a model the facts it is later asked to forget (as ``sga demo`` does before unlearning) or to
fine-tune the retain model that forget quality is measured against.
"""
from __future__ import annotations

from sga.methods.base import Objective, ObjectiveOutput
from sga.methods.sequence_nll import weighted_sequence_loss


class SupervisedFineTuning(Objective):
    """``sft``: L = +l(x), descent on the token-mean NLL of the training answers: ordinary supervised
    fine-tuning, used to teach a model what it later forgets. The records are the trainer's "forget"
    data; the logged ``forget_nll`` is the training NLL."""

    name = "sft"

    def compute(self, model, batch, num_forget):
        loss, (nll,) = weighted_sequence_loss(model, batch, [("forget", 1.0)], num_forget, backend=self.backend)
        return ObjectiveOutput(loss=loss, forget_nll=nll)
