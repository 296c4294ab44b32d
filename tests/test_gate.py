"""The evaluation gate on hand-made predictions: what passes and what is rejected, and why."""

import numpy as np

from online.gate import evaluate_gate


class Fixed:
    """A 'model' that answers fixed predictions (the gate only calls predict)."""

    def __init__(self, answers):
        self.answers = np.asarray(answers)

    def predict(self, x):
        return self.answers[np.asarray(x, dtype=int).ravel()]


def idx(n):
    return np.arange(n)[:, None]


def test_validation_drop_within_allowance_passes_and_beyond_is_rejected():
    y = np.zeros(100, int)
    champion = Fixed(np.zeros(100, int))
    one_wrong = Fixed(np.r_[np.ones(1, int), np.zeros(99, int)])
    two_wrong = Fixed(np.r_[np.ones(2, int), np.zeros(98, int)])
    assert evaluate_gate(champion, one_wrong, idx(100), y, idx(0), y[:0], max_val_drop=0.01).passed
    verdict = evaluate_gate(champion, two_wrong, idx(100), y, idx(0), y[:0], max_val_drop=0.01)
    assert not verdict.passed and "validation accuracy fell 2.00 points" in verdict.summary


def test_heldout_needs_evidence_of_being_worse():
    y = np.zeros(40, int)
    champion = Fixed(np.zeros(40, int))
    loses_one = Fixed(np.r_[np.ones(1, int), np.zeros(39, int)])  # 1 lost, 0 won: within one standard error
    loses_ten = Fixed(np.r_[np.ones(10, int), np.zeros(30, int)])
    val = (idx(40), y)
    assert evaluate_gate(champion, loses_one, *val, idx(40), y, max_val_drop=1.0).passed
    assert not evaluate_gate(champion, loses_one, *val, idx(40), y, max_val_drop=1.0, z=0).passed  # the literal rule
    verdict = evaluate_gate(champion, loses_ten, *val, idx(40), y, max_val_drop=1.0)
    assert not verdict.passed and "lost 10, won 0" in verdict.summary
