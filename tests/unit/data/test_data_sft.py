"""Step-1 tokenisation (label masks, eos, truncation) and the padding collate."""

import pytest
import torch

from dschat_cli.data.sft import IGNORE_INDEX, collate_sft, tokenize_sft

PROMPT = " Human: What is a cat? Assistant:"
ANSWER = " A small animal."


def _one(tok, max_seq_len=512, mask_prompt=True, prompt=PROMPT, answer=ANSWER):
    out = tokenize_sft({"prompt": [prompt], "chosen": [answer]}, tok, max_seq_len, mask_prompt)
    return (out["input_ids"][0], out["labels"][0]) if out["input_ids"] else (None, None)


def test_masked_prompt_and_eos_label(data_tokenizer):
    tok = data_tokenizer
    ids, labels = _one(tok)
    n_prompt = len(tok(PROMPT)["input_ids"])
    n_answer = len(tok(ANSWER)["input_ids"])
    assert ids == tok(PROMPT + ANSWER)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == n_prompt + n_answer + 1
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # answer and eos are learned
    assert labels[-1] == tok.eos_token_id
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX],
                      skip_special_tokens=True) == ANSWER


def test_unmasked_prompt_is_reference_behaviour(data_tokenizer):
    ids, labels = _one(data_tokenizer, mask_prompt=False)
    assert labels == ids


def test_truncation_keeps_the_beginning_and_drops_eos(data_tokenizer):
    tok = data_tokenizer
    full, _ = _one(tok)
    n_prompt = len(tok(PROMPT)["input_ids"])
    ids, labels = _one(tok, max_seq_len=n_prompt + 2)
    assert ids == full[: n_prompt + 2]
    assert tok.eos_token_id not in ids  # a cut answer must not teach stopping
    assert labels == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def test_fully_truncated_answer_is_dropped(data_tokenizer):
    n_prompt = len(data_tokenizer(PROMPT)["input_ids"])
    for mask in (True, False):
        assert _one(data_tokenizer, max_seq_len=n_prompt, mask_prompt=mask) == (None, None)


def test_batch_keeps_source_and_order(data_tokenizer):
    out = tokenize_sft({"prompt": [PROMPT, " Human: hi Assistant:"], "chosen": [ANSWER, " yo"],
                        "source": ["a", "b"]}, data_tokenizer, 512, True)
    assert out["source"] == ["a", "b"] and len(out["input_ids"]) == 2


def test_collate_right_pads_with_masks_from_lengths():
    eos = pad = 1  # pad == eos, as for models without a pad token
    feats = [{"input_ids": [5, 6, 7, eos], "labels": [-100, -100, 7, eos]},
             {"input_ids": [8, eos], "labels": [8, eos]}]
    b = collate_sft(feats, pad_token_id=pad)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 1, 1]]
    # the eos of row 1 is real (mask 1, label kept); the pads after it are not
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 1], [8, 1, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_pad_to_multiple():
    b = collate_sft([{"input_ids": [3, 4, 5], "labels": [3, 4, 5]}], pad_token_id=0,
                    pad_to_multiple_of=8)
    assert b["input_ids"].shape == (1, 8) and b["attention_mask"].sum() == 3


def test_collate_needs_pad_id():
    with pytest.raises(ValueError):
        collate_sft([{"input_ids": [1], "labels": [1]}], pad_token_id=None)


@pytest.fixture
def bos_eos_tokenizer(data_tokenizer):
    """Like Llama's: the tokenizer itself adds <s> in front (and here also </s> at the end)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(data_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 1)])
    return tok


def test_bos_belongs_to_prompt_and_eos_not_doubled(bos_eos_tokenizer, data_tokenizer):
    ids, labels = _one(bos_eos_tokenizer)
    plain, _ = _one(data_tokenizer)
    assert ids == [2] + plain  # <s> + text + a single </s>
    n_prompt = 1 + len(data_tokenizer(PROMPT)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


def test_data_layer_restores_progress_bars(tmp_path):
    import datasets

    from dschat_cli.data.sources import load_source

    f = tmp_path / "d.json"
    f.write_text('[{"prompt": "p", "chosen": "c"}, {"prompt": "q", "chosen": "d"}]')
    datasets.enable_progress_bars()
    load_source(str(f), None)
    assert not datasets.are_progress_bars_disabled()
