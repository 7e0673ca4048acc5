"""--report-to in a real run: the metrics of metrics.jsonl reach TensorBoard and W&B under the same
names and steps.

    WANDB_MODE=offline dschat sft ... --report-to wandb --report-to tensorboard --launcher none
        -> OUT/tensorboard/events.out.tfevents.*   (add_scalar per metric)
           OUT/wandb/offline-run-*-ID/run-ID.wandb  (W&B's offline run: history and config)
           OUT/wandb_run_id                         (ID, for --resume)

In process and two optimizer steps of the tiny model: a few seconds. W&B writes only under the
test's temp folders (WANDB_DIR, WANDB_CACHE_DIR, WANDB_CONFIG_DIR), never under $HOME.
"""

from __future__ import annotations

import json
import math
import struct

import pytest

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def wandb_records(path):
    """The records of an offline run's .wandb file, as wandb's own protobuf messages. wandb 0.31
    has no Python reader (its Go core writes the file) and an offline run writes no
    wandb-summary.json, so this reads the file's framing, LevelDB's log format: a 7-byte header
    (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a
    header is zero padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length, kind) == (0, 0):  # the rest of the block is padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def history_items(record):
    """A history record's {name: value} (wandb 0.31 puts a name in key or in nested_key)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json)
            for i in record.history.item}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its files only under the test's temp folders (never under $HOME)."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline needs no login


def test_the_offline_run_is_whole_on_disk_when_the_log_closes(tmp_path, wandb_offline,
                                                              monkeypatch):
    """wandb's run.finish() only asks its service to close the run's stream (a message it does
    not wait on) and returns; until the service gets to it the file may hold only its 7-byte
    header (what a loaded CI machine once read). Here the service never gets that message, the
    slowest case: MetricsLog.close() must still leave the whole run on disk."""
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    from dschat_cli.ui.metrics import WANDB_RUN_ID, MetricsLog

    monkeypatch.setattr(ServiceConnection, "inform_finish", lambda self, run_id: None)

    out = tmp_path / "out"
    out.mkdir()
    log = MetricsLog(out / "metrics.jsonl", wandb={"project": "dschat", "name": "out",
                                                   "job_type": "sft", "dir": str(out)})
    log.log(1, loss=2.0)
    log.log(2, loss=1.5, eval_loss=1.75)
    log.close()
    run_id = (out / WANDB_RUN_ID).read_text().strip()
    [path] = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = list(wandb_records(path))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds and kinds[-1] == "exit", kinds  # [] without the wait: the header alone
    history = [{k: v for k, v in history_items(r).items() if not k.startswith("_")}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert history == [{"loss": 2.0}, {"loss": 1.5, "eval_loss": 1.75}]


def test_sft_reports_the_same_metrics_to_wandb_offline_and_tensorboard(
        tmp_path, wandb_offline, tiny_llama, pairs_dir, invoke_dschat, sft_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    r = invoke_dschat(*sft_args(tiny_llama, out, tmp_path / "cache", pairs_dir, zero_stage=0,
                                extra=("--launcher", "none", "--max-steps", "2",
                                       "--report-to", "wandb", "--report-to", "tensorboard")))
    assert r.code == 0, r.explain()
    record = json.loads((out / "resolved.json").read_text())
    assert record["report_to"] == ["tensorboard", "wandb"]
    assert record["wandb"] == {"project": "dschat", "name": "out", "job_type": "sft",
                               "dir": str(out.resolve())}

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, dict[int, float]] = {}  # metric -> {step: value}
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                expected.setdefault(k, {})[row["step"]] = v
    assert {"loss", "lr", "eval_loss", "eval_ppl"} <= set(expected), sorted(expected)

    # W&B: one offline run in OUT/wandb, its id kept for --resume, history rows at our steps
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").iterdir())
    logged: dict[str, dict[int, float]] = {}
    config = {}
    for rec in wandb_records(runs[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = history_items(rec)
            for k, v in items.items():
                if not k.startswith("_"):
                    logged.setdefault(k, {})[items["_step"]] = v
        elif kind == "run":  # wandb.init's config
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert set(logged) == set(expected)
    for k, by_step in expected.items():
        assert logged[k] == pytest.approx(by_step, rel=1e-6), k
    assert config["optim"]["learning_rate"] == pytest.approx(1e-3)  # the run config went along
    assert config["report"]["report_to"] == ["wandb", "tensorboard"]

    # TensorBoard: the same names and numbers (OUT/tensorboard's own event file; DeepSpeed's
    # monitor writes its own names in a subfolder)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for k, by_step in expected.items():
        tb = {e.step: e.value for e in events.Scalars(k)}
        assert tb == pytest.approx(by_step, rel=1e-5), k
    assert all(math.isfinite(v) for v in logged["loss"].values())
