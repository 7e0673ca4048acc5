"""The steps' shared helpers: eval sums count every sample once although the sampler repeats some
to even out the ranks; the header names where the ranks run; DeepSpeed's unasked memory report
stays out of the log."""

import pytest
from torch.utils.data import DistributedSampler

from dschat_cli.dist import Dist
from dschat_cli.steps.common import real_samples


@pytest.mark.parametrize("n,world", [(7, 3), (8, 4), (5, 2), (3, 4), (10, 1)])
def test_real_samples_marks_each_index_exactly_once(n, world):
    counts = [0] * n
    for rank in range(world):
        idx = list(DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=False))
        dist = Dist(rank=rank, local_rank=rank, world_size=world, device="cpu")
        # in two "batches" to check the offset arithmetic
        half = len(idx) // 2
        keep = real_samples(dist, n, 0, half).tolist() + \
            real_samples(dist, n, half, len(idx) - half).tolist()
        for i, k in zip(idx, keep):
            counts[i] += int(k)
    assert counts == [1] * n


def test_placement_says_where_the_ranks_run():
    """Rank 0 prints the run's header: its own cuda:0 must not read as if every rank shared it."""
    from dschat_cli.dist import Dist

    assert Dist(0, 0, 4, "cuda:0").placement == "4 rank(s), one GPU each"
    assert Dist(0, 0, 1, "cuda:0").placement == "1 rank on cuda:0"
    assert Dist(0, 0, 2, "cpu").placement == "2 rank(s) on cpu"


def test_ds_initialize_drops_deepspeeds_memory_report_and_keeps_the_rest(monkeypatch, capsys):
    import deepspeed

    from dschat_cli.steps.common import ds_initialize

    def fake_initialize(**kwargs):  # what DeepSpeed 0.19's BF16_Optimizer prints, among others
        print("begin bf16_optimizer")
        print("MA 19.61 GB         Max_MA 22.06 GB         CA 29.79 GB         Max_CA 30 GB ")
        print("CPU Virtual Memory:  used = 1.68 GB, percent = 1.3%")
        print("before initializing group 0")
        print("a line of DeepSpeed's own that the log keeps")
        print("after initializing group 0")
        print("end bf16_ optimizer")
        return ("engine", kwargs["config"]), None, None, None

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    assert ds_initialize(model=None, config={"x": 1}) == ("engine", {"x": 1})
    assert capsys.readouterr().out == "a line of DeepSpeed's own that the log keeps\n"

    def failing_initialize(**kwargs):  # what was printed before an error still reaches the log
        print("begin bf16_optimizer")
        print("DeepSpeed says why")
        raise RuntimeError("boom")

    monkeypatch.setattr(deepspeed, "initialize", failing_initialize)
    with pytest.raises(RuntimeError, match="boom"):
        ds_initialize(model=None, config={})
    assert capsys.readouterr().out == "DeepSpeed says why\n"
