"""Every rank enters the same collectives at every rank count: ZeroAdamP's all-reduce of its sums, computed over
ZeRO-1/2's partitions of real models' parameters for 2 to 64 ranks (a rank whose partition holds only whole
parameters once skipped it while its peers entered it, and the run waited forever)."""
import math

import pytest
import torch

from autowu.adamp import FlatLayout


def zero_partitions(shapes, ranks):
    """DeepSpeed 0.19.8's ZeRO-1/2 layout of one param group (stage_1_and_2.py): parameters back to back in their
    order (no round robin, no per-parameter alignment: the defaults), the flat buffer padded to a multiple of
    2 x ranks, equal partitions. One FlatLayout a rank."""
    offsets, end = [], 0
    for shape in shapes:
        offsets.append(end)
        end += math.prod(shape)
    size = -(-end // (2 * ranks)) * 2 * ranks // ranks
    starts = tuple(r * size for r in range(ranks))
    return [FlatLayout(tuple(shapes), tuple(offsets), start, size, starts) for start in starts]


def entered(layout):
    """Whether the rank with this partition enters the sums' all-reduce (what ZeroAdamP's step decides)."""
    return layout.cuts_here or layout.group_reduces(in_group=True)


def model_shapes(name):
    import timm
    if name == "toy":  # three ranks: rank 0 holds one whole matrix, ranks 1 and 2 share the next
        return [(2, 5), (3, 5), (5,)]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10 if name == "test_resnet" else 1000)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "test_resnet", "toy"])
def test_every_rank_enters_the_sums_all_reduce_alike_on_2_to_64_ranks(name):
    shapes = model_shapes(name)
    disagreed_before = []   # where the old rule (only a rank holding a cut parameter enters) left some rank out
    for ranks in range(2, 65):
        layouts = zero_partitions(shapes, ranks)
        assert sum(l.numel for l in layouts) >= sum(math.prod(s) for s in shapes)
        decisions = {entered(l) for l in layouts}
        assert len(decisions) == 1, (name, ranks, [entered(l) for l in layouts])
        if len({l.cuts_here for l in layouts}) > 1:
            disagreed_before.append(ranks)
    # The layouts that hung: every rank count of the toy and the published ones of the real models.
    expected = {"toy": 3, "efficientnet_b0": 10, "test_resnet": 19}
    if name in expected:
        assert expected[name] in disagreed_before, disagreed_before
