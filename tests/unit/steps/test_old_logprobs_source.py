"""--old-logprobs: which rollouts take the fast engine's logprobs, which are checked against the
actor's forward pass, and when auto switches (steps/rl/experience.py's OldLogprobsSource)."""

from dschat_cli.steps.rl.experience import OldLogprobsSource


def plans(source, gaps: dict[int, float], rollouts: int, engine: bool = True):
    """[(rollout, took the engine's, checked)], feeding each check the gap given for it (0.01
    when none is given), as ExperienceMaker does."""
    out = []
    for r in range(1, rollouts + 1):
        use, check = source.plan(r, engine)
        if check:
            source.observe(r, gaps.get(r, 0.01))
            use = use and source.from_generation
        out.append((r, use, check))
    return out


def test_forward_checks_every_rollout_and_never_takes_the_engines():
    s = OldLogprobsSource("forward", interval=3, switch_gap=0.03)
    assert plans(s, {}, 4) == [(1, False, True), (2, False, True), (3, False, True),
                               (4, False, True)]


def test_generation_checks_rollout_1_then_every_interval():
    s = OldLogprobsSource("generation", interval=3, switch_gap=0.03)
    # checked on 1, 4, 7: 1 + k x 3
    assert [r for r, use, check in plans(s, {}, 7) if check] == [1, 4, 7]
    assert all(use for _, use, _ in plans(OldLogprobsSource("generation", interval=3,
                                                            switch_gap=0.03), {}, 7))


def test_auto_switches_after_the_first_check_within_the_gap():
    s = OldLogprobsSource("auto", interval=3, switch_gap=0.03)
    # rollout 1: forward, gap 0.01 <= 0.03 -> the engine's from rollout 2; rollout 1 was the
    # check, so the next ones are 1 + 3 = 4 and 7
    got = plans(s, {1: 0.01}, 7)
    assert got == [(1, False, True), (2, True, False), (3, True, False), (4, True, True),
                   (5, True, False), (6, True, False), (7, True, True)]
    assert s.describe(True) == "fast engine's sampling pass (from rollout 2)"


def test_auto_waits_for_a_check_within_the_gap():
    s = OldLogprobsSource("auto", interval=10, switch_gap=0.03)
    # 0.05 and 0.031 are above the gap (not above --parity-tolerance: the run goes on)
    got = plans(s, {1: 0.05, 2: 0.031, 3: 0.03}, 5)
    assert got == [(1, False, True), (2, False, True), (3, False, True), (4, True, False),
                   (5, True, False)]


def test_auto_falls_back_to_forward_for_good_when_a_later_check_is_above_the_gap():
    s = OldLogprobsSource("auto", interval=2, switch_gap=0.03)
    news = []
    for r in range(1, 8):
        use, check = s.plan(r, True)
        if check:
            news.append((r, s.observe(r, 0.05 if r == 3 else 0.01)))
    # switched after 1, checked on 3 (0.05 > 0.03): forward from rollout 3 on, checked always,
    # and a gap of 0.01 afterwards does not switch again
    assert "from rollout 2 on" in news[0][1] and "0.0100 nats <= --parity-switch-gap 0.03" \
        in news[0][1]
    assert news[1][0] == 3 and "back to the actor's forward pass from rollout 3 on" in news[1][1]
    assert [r for r, _ in news] == [1, 3, 4, 5, 6, 7] and all(n is None for _, n in news[2:])
    assert s.plan(8, True) == (False, True)
    assert "fell back" in s.describe(True)


def test_no_engine_logprobs_means_forward_without_a_check():
    s = OldLogprobsSource("auto", interval=10, switch_gap=0.03)
    assert s.plan(1, False) == (False, False)
    assert "transformers' generate" in s.describe(False)


def test_a_checkpoints_state_continues_the_schedule_exactly():
    s = OldLogprobsSource("auto", interval=3, switch_gap=0.03)
    plans(s, {1: 0.01}, 5)  # switched after rollout 1; checks due on 4, 7, ...
    resumed = OldLogprobsSource("auto", interval=3, switch_gap=0.03)
    resumed.load_state_dict(s.state_dict())
    assert [resumed.plan(r, True) for r in (6, 7, 8)] == [s.plan(r, True) for r in (6, 7, 8)] \
        == [(True, False), (True, True), (True, False)]
    # another mode's state (the user changed --old-logprobs) or none: start afresh
    fresh = OldLogprobsSource("forward", interval=3, switch_gap=0.03)
    fresh.load_state_dict(s.state_dict())
    assert fresh.plan(6, True) == (False, True)
    afresh = OldLogprobsSource("auto", interval=3, switch_gap=0.03)
    afresh.load_state_dict(None)
    assert afresh.plan(6, True) == (False, True)
