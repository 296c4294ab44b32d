"""The evaluation gate on hand-made outcomes: what passes and what is rejected, and why."""

import numpy as np

from online.gate import ANSWERS_WORSE, NO_EVIDENCE, REASON_CODES, TOO_LITTLE_EVIDENCE, VALIDATION_DROP, evaluate_gate


def evidence(n: int, candidate_p: float, root_p: float, candidate_right: float = 0.6, root_right: float = 0.6, seed: int = 0):
    """N items of 3 classes (label 0): each model gives the label about ``*_p`` probability and is
    right (label on top) on the given share of items."""
    rng = np.random.default_rng(seed)

    def proba(p_label: float, right: float):
        out = np.zeros((n, 3))
        top = rng.random(n) < right
        jitter = np.clip(p_label + rng.normal(0, 0.05, n), 0.02, 0.98)
        out[:, 0] = np.where(top, np.maximum(jitter, 0.5), np.minimum(jitter, 0.3))
        out[:, 1] = np.where(top, (1 - out[:, 0]) * 0.6, 1 - out[:, 0] - 0.05)
        out[:, 2] = 1 - out[:, 0] - out[:, 1]
        return out

    return proba(candidate_p, candidate_right), proba(root_p, root_right), np.zeros(n, int)


def test_a_real_gain_without_forgetting_passes():
    cand, root, y = evidence(120, 0.6, 0.4, candidate_right=0.7, root_right=0.5)
    verdict = evaluate_gate(0.60, 0.595, cand, root, y)
    assert verdict.passed, verdict.summary
    assert verdict.metrics["feedback_p_value"] < 0.001 and verdict.metrics["feedback_won"] > verdict.metrics["feedback_lost"]


def test_forgetting_beyond_the_allowance_is_rejected_whatever_the_gain():
    cand, root, y = evidence(120, 0.6, 0.4, candidate_right=0.7, root_right=0.5)
    verdict = evaluate_gate(0.60, 0.585, cand, root, y, max_val_drop=0.01)
    assert not verdict.passed and "validation accuracy fell 1.50 points" in verdict.summary
    assert evaluate_gate(0.60, 0.59, cand, root, y, max_val_drop=0.01).passed  # exactly the allowance


def rows(p_label: float, right: np.ndarray) -> np.ndarray:
    """3-class probabilities with ``p_label`` on the label (class 0): on top where ``right``, second otherwise."""
    other = np.where(right, (1 - p_label) / 2, 1 - p_label - 0.01)
    return np.stack([np.full(len(right), p_label), other, 1 - p_label - other], 1)


def test_a_tie_or_too_little_evidence_is_not_a_gain():
    cand, root, y = evidence(200, 0.5, 0.5, seed=1)
    assert not evaluate_gate(0.6, 0.6, cand, cand, y).passed  # identical answers: a tie
    half = np.arange(200) < 100  # each better on half the items, by the same margin: a tie
    swapped = evaluate_gate(0.6, 0.6, np.where(half[:, None], cand, root), np.where(half[:, None], root, cand), y)
    assert not swapped.passed and "no evidence of a gain" in swapped.summary
    few = evaluate_gate(0.6, 0.6, *evidence(3, 0.6, 0.4, candidate_right=0.7, root_right=0.5))
    assert not few.passed and "too little evidence: 3" in few.summary
    assert not evaluate_gate(0.6, 0.6, np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, int)).passed  # no feedback


def test_better_calibrated_but_answering_worse_is_rejected():
    n = 100
    root_right = np.arange(n) < 60
    cand_right = np.arange(n) < 50
    root = np.where(root_right[:, None], rows(0.9, root_right), rows(0.01, root_right))  # sure, and badly wrong 40 times
    cand = np.where(cand_right[:, None], rows(0.5, cand_right), rows(0.4, cand_right))  # cautious, wrong 50 times
    verdict = evaluate_gate(0.60, 0.60, cand, root, np.zeros(n, int))
    assert verdict.metrics["feedback_p_value"] < 0.05  # its probabilities are better...
    assert not verdict.passed and "answers worse" in verdict.summary and "won 0 and lost 10" in verdict.summary


def test_each_reason_has_a_machine_readable_code_for_metrics():
    cand, root, y = evidence(120, 0.6, 0.4, candidate_right=0.7, root_right=0.5)
    assert evaluate_gate(0.60, 0.595, cand, root, y).codes == []
    assert evaluate_gate(0.60, 0.50, cand, root, y).codes == [VALIDATION_DROP]
    assert evaluate_gate(0.6, 0.6, cand, cand, y).codes == [NO_EVIDENCE]
    few = evaluate_gate(0.6, 0.6, *evidence(3, 0.6, 0.4))
    assert few.codes[0] == TOO_LITTLE_EVIDENCE and len(few.codes) == len(few.reasons)
    worse = evaluate_gate(0.6, 0.6, *evidence(120, 0.5, 0.5, candidate_right=0.3, root_right=0.8))
    assert ANSWERS_WORSE in worse.codes and set(worse.codes) <= set(REASON_CODES) and len(worse.codes) == len(worse.reasons)


def test_promotions_without_a_gain_over_the_champion_are_bounded():
    """A candidate that beats the root but not the champion (on the items the champion was not
    taught) is an unproven promotion; past ``max_unproven`` in a row the gate refuses."""
    from online.gate import NO_GAIN_OVER_CHAMPION, paired_evidence

    cand, root, y = evidence(120, 0.6, 0.4, candidate_right=0.7, root_right=0.5)
    same = paired_evidence(cand[:30], cand[:30], y[:30])  # the champion answers the unseen items as the candidate does
    assert not same.shows_gain(0.05)
    first = evaluate_gate(0.6, 0.6, cand, root, y, over_champion=same, unproven_before=0, max_unproven=2)
    assert first.passed and first.unproven_promotions == 1
    third = evaluate_gate(0.6, 0.6, cand, root, y, over_champion=same, unproven_before=2, max_unproven=2)
    assert not third.passed and third.codes == [NO_GAIN_OVER_CHAMPION]
    assert evaluate_gate(0.6, 0.6, cand, root, y, over_champion=same, unproven_before=2, max_unproven=None).passed  # no bound
    # A real gain over the champion resets the count, whatever came before.
    better = paired_evidence(*evidence(40, 0.7, 0.4, candidate_right=0.8, root_right=0.5, seed=3))
    assert better.shows_gain(0.05)
    proven = evaluate_gate(0.6, 0.6, cand, root, y, over_champion=better, unproven_before=5, max_unproven=2)
    assert proven.passed and proven.unproven_promotions == 0
    # When the champion is the root itself, the comparison with the root is that test.
    assert evaluate_gate(0.6, 0.6, cand, root, y).unproven_promotions == 0


def test_losing_a_few_more_items_than_winning_is_refused_only_when_significant_if_asked():
    """worse_alpha: at 0.5 any net loss of top answers refuses (the default); below, only a loss an exact test calls real."""
    n = 200
    i = np.arange(n)
    root_right = i < 110  # right on 0..109
    cand_right = (i >= 10) & (i < 118)  # loses 0..9 (10), wins 110..117 (8)
    # Both right: the candidate surer; both wrong: the candidate closer. Its probabilities are better overall.
    cand = np.where(cand_right[:, None], rows(0.9, cand_right), rows(0.45, cand_right))
    root = np.where(root_right[:, None], rows(0.6, root_right), rows(0.2, root_right))
    y = np.zeros(n, int)
    strict = evaluate_gate(0.6, 0.6, cand, root, y)
    assert not strict.passed and strict.codes == [ANSWERS_WORSE], strict.summary
    assert strict.metrics["feedback_p_value"] < 0.05 and strict.metrics["feedback_p_worse"] > 0.3
    assert evaluate_gate(0.6, 0.6, cand, root, y, worse_alpha=0.05).passed  # 10 lost to 8 won: a coin's toss


def test_a_candidate_must_beat_the_champions_own_learning_of_the_same_items():
    """A backbone adaptation beats the root but not the online champion it would replace (both cross-fitted): refused;
    level with it: refused too (no evidence of a gain); clearly better: passes."""
    from online.gate import NOT_BETTER_THAN_CHAMPION

    cand, root, y = evidence(120, 0.6, 0.4, candidate_right=0.7, root_right=0.5)
    champion, _, _ = evidence(120, 0.7, 0.4, candidate_right=0.85, root_right=0.5, seed=1)
    assert evaluate_gate(0.60, 0.60, cand, root, y).passed  # against the root alone it would pass
    refused = evaluate_gate(0.60, 0.60, cand, root, y, champion_proba=champion)
    assert not refused.passed and refused.codes == [NOT_BETTER_THAN_CHAMPION] and "over the champion's own learning" in refused.summary
    assert refused.metrics["feedback_accuracy_champion"] > refused.metrics["feedback_accuracy_candidate"]
    assert evaluate_gate(0.60, 0.60, cand, root, y, champion_proba=cand).codes == [NOT_BETTER_THAN_CHAMPION]  # a tie
    weaker, _, _ = evidence(120, 0.4, 0.4, candidate_right=0.5, root_right=0.5, seed=2)
    assert evaluate_gate(0.60, 0.60, cand, root, y, champion_proba=weaker).passed  # better than the champion: passes
