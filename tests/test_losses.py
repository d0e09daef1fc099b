import math

import pytest
import torch

from raysys.losses import contrastive_loss, grouped_ce, info_nce, pointwise_bce


def test_in_batch_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 1.0]])  # group size 2
    loss = info_nce(q, p, group_size=2, temperature=1.0)
    s0 = [1.0, 0.5, 0.0, 1.0]  # q0 against all passages; target 0
    s1 = [0.0, 0.5, 1.0, 1.0]  # q1; target 2
    expect = (
        -s0[0]
        + math.log(sum(math.exp(x) for x in s0))
        - s1[2]
        + math.log(sum(math.exp(x) for x in s1))
    ) / 2
    assert loss.item() == pytest.approx(expect, abs=1e-6)


def test_group_only_ignores_other_groups():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 1.0]])
    loss = info_nce(q, p, group_size=2, temperature=1.0, in_batch=False)
    e0 = -1.0 + math.log(math.exp(1.0) + math.exp(0.5))
    e1 = -1.0 + math.log(math.exp(1.0) + math.exp(1.0))
    assert loss.item() == pytest.approx((e0 + e1) / 2, abs=1e-6)


def test_false_negative_mask_removes_known_positives():
    torch.manual_seed(0)
    q = torch.randn(2, 4)
    p = torch.randn(4, 4)
    ids = ["a", "n1", "b", "a"]  # q0's positive "a" reappears as q1's negative
    pos = [{"a"}, {"b"}]
    masked = info_nce(q, p, group_size=2, temperature=0.1, passage_ids=ids, query_positive_ids=pos)
    # q0 must not see column 3 (its own positive again); q1 sees everything.
    s = q @ p.T / 0.1
    l0 = torch.logsumexp(s[0, :3], 0) - s[0, 0]
    l1 = torch.logsumexp(s[1], 0) - s[1, 2]
    assert masked.item() == pytest.approx(((l0 + l1) / 2).item(), rel=1e-5)


@pytest.mark.parametrize("in_batch", [True, False])
def test_false_negative_mask_by_hand_on_a_tied_row(in_batch):
    """The last column repeats the target's passage, tied at the top: masked,
    it leaves the softmax, log(1 + 2 e^-5) = 0.0134; kept it would be a second
    target, log(2 + 2 e^-5) = 0.700."""
    scores = torch.tensor([[5.0, 0.0, 0.0, 5.0]])
    kw = dict(group_size=4, in_batch=in_batch)
    unmasked = contrastive_loss(scores, passage_ids=["p", "n1", "n2", "p"], **kw)  # no positives
    assert unmasked.item() == pytest.approx(math.log(2.0 + 2 * math.exp(-5)), abs=1e-6)
    masked = contrastive_loss(
        scores, passage_ids=["p", "n1", "n2", "p"], query_positive_ids=[{"p"}], **kw
    )
    assert masked.item() == pytest.approx(math.log(1.0 + 2 * math.exp(-5)), abs=1e-6)
    assert masked.item() == pytest.approx(0.0134, abs=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected 6 passages"):
        info_nce(torch.randn(2, 3), torch.randn(5, 3), group_size=3, temperature=1.0)


def test_grouped_ce_equals_hand_value():
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    g1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    g2 = -math.log(1 / (1 + 1 + math.exp(1)))
    assert grouped_ce(scores, 3).item() == pytest.approx((g1 + g2) / 2, abs=1e-6)


def test_pointwise_bce_equals_hand_value():
    scores = torch.tensor([2.0, -1.0, 0.5, 0.0])

    def sig(x):
        return 1 / (1 + math.exp(-x))

    hand = -(math.log(sig(2)) + math.log(1 - sig(-1)) + math.log(sig(0.5)) + math.log(0.5)) / 4
    assert pointwise_bce(scores, 2).item() == pytest.approx(hand, abs=1e-6)
