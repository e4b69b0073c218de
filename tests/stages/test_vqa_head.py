"""The VQA answer head's soft counters: sums over the image's valid regions, so they grow with the number of
regions that match (what softmax attention into [CLS] cannot carry), and padded regions never count."""
from __future__ import annotations

import torch
from torch import nn

from stages.models.vlp import AnswerHead


def test_soft_counters_count_matching_valid_regions_only():
    h, k = 4, 5
    head = AnswerHead(h, 8, 3, counters=1)
    head.mlp = nn.Identity()  # expose [CLS state, counts]
    with torch.no_grad():  # the counter fires on a region whose feature 0 is +1, not on -1
        head.counter.weight.zero_()
        head.counter.weight[0, 0] = 40.0
        head.counter.bias.zero_()
    states = torch.zeros(3, 1 + k + 4, h)
    states[:, 1:1 + k, 0] = -1.0
    states[0, 1:3, 0] = 1.0  # image 0: 2 matching regions
    states[1, 1:5, 0] = 1.0  # image 1: 4 matching regions, but only 3 valid
    states[2, 1:6, 0] = 1.0  # image 2: 5 matching, all valid
    out = head(states, torch.tensor([5, 3, 5]), k)
    assert out.shape == (3, h + 1)
    torch.testing.assert_close(out[:, -1], torch.tensor([2.0, 3.0, 5.0]), atol=1e-6, rtol=0)


def test_without_counters_the_head_reads_cls_only():
    head = AnswerHead(4, 8, 3, counters=0)
    assert head.counter is None and head.mlp[0].in_features == 4
    states = torch.randn(2, 9, 4)
    a = head(states, torch.tensor([5, 5]), 5)
    states[:, 1:] = torch.randn(2, 8, 4)  # regions and text change, [CLS] does not
    torch.testing.assert_close(head(states, torch.tensor([5, 1]), 5), a)
