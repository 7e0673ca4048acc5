"""The worker's side of the run record: it reads resolved.json next to the run config, refuses a
record that is missing or belongs to another step, and a rank whose hardware disagrees with it."""

from __future__ import annotations

import pytest

from dschat_cli import worker
from dschat_cli.config.resolved import resolve_run
from dschat_cli.config.schema import ConfigError, from_flags, to_yaml
from dschat_cli.config.sft import SFTConfig
from dschat_cli.dist import Dist


def run_folder(tmp_path, *, record_step: str | None = "sft"):
    """An sft run's folder as the launch writes it; its record says `record_step` (None: no
    record)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = from_flags(SFTConfig, model="m", output_dir=str(tmp_path))
    (tmp_path / "run_config.yaml").write_text(to_yaml(cfg))
    if record_step:
        record = resolve_run("sft", cfg, world_size=1, device="cpu", bf16_supported=False,
                             hub_reachable=False)
        type(record)(**{**record.to_dict(), "step": record_step}).write(tmp_path)
    return str(tmp_path / "run_config.yaml")


def test_unknown_step_and_missing_record_are_one_line_exit_2(tmp_path, capsys):
    assert worker.main(["kto", run_folder(tmp_path)]) == 2
    assert "unknown step 'kto'" in capsys.readouterr().err
    assert worker.main(["sft", run_folder(tmp_path / "bare", record_step=None)]) == 2
    err = capsys.readouterr().err
    assert "resolved.json" in err and "run the dschat command again" in err
    assert "Traceback" not in err


def test_a_record_of_another_step_is_refused(tmp_path, capsys):
    assert worker.main(["sft", run_folder(tmp_path, record_step="reward")]) == 2
    assert "is the record of a reward run, not sft" in capsys.readouterr().err


def test_a_rank_with_other_hardware_than_the_record_stops(tmp_path):
    cfg = from_flags(SFTConfig, model="m", output_dir=str(tmp_path))
    record = resolve_run("sft", cfg, world_size=2, device="cpu", bf16_supported=False,
                         hub_reachable=False)
    worker.check_hardware(record, Dist(rank=0, local_rank=0, world_size=2, device="cpu"))
    with pytest.raises(ConfigError, match="resolved for 2 rank\\(s\\) but 3 started"):
        worker.check_hardware(record, Dist(rank=0, local_rank=0, world_size=3, device="cpu"))


def test_warnings_print_as_one_line_and_an_empty_one_names_its_origin(capsys):
    worker._show_warning(UserWarning("cache is cold"), UserWarning, "/x/y.py", 7)
    assert capsys.readouterr().err.strip() == "warning: cache is cold"
    # an H100 bench printed three bare "warning:" lines (a library warned with no text)
    worker._show_warning(UserWarning(""), UserWarning, "/site/torch/_inductor/foo.py", 42)
    err = capsys.readouterr().err.strip()
    assert err == "warning: UserWarning with no message, from /site/torch/_inductor/foo.py:42"


def test_inductors_online_softmax_note_is_silenced_and_other_warnings_are_not(capsys):
    import warnings

    saved = (warnings.filters[:], warnings.showwarning)
    try:
        worker._quiet_libraries(0)
        # as torch._inductor.lowering words it, its first line empty (an H100 bench still
        # printed it three times while the filter matched only text at the message's start)
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit "
                      "the reduction. Cut an issue to PyTorch if this is an\nimportant use case "
                      "and you want to speed it up with online\nsoftmax.\n", UserWarning)
        assert capsys.readouterr().err == ""
        warnings.warn("the cache is cold", UserWarning)
        assert capsys.readouterr().err.strip() == "warning: the cache is cold"
    finally:
        warnings.filters[:], warnings.showwarning = saved
