"""Load a trained model for generation and turn prompts into clean answers (eval and chat)."""

from __future__ import annotations

from pathlib import Path

from dschat_cli.config.eval import GenerationOptions
from dschat_cli.config.schema import ConfigError

STOP_STRINGS = ["Human:"]  # the model starting the next turn ends its answer


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device} requested but no GPU is available; use cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError("--device", f"'{device}' is not cpu, cuda or cuda:N")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "fp16" and device == "cpu":
        raise ConfigError("--dtype", "fp16 on CPU is not supported; use fp32 or bf16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def check_causal_lm_dir(path: str, flag: str, *, trust_remote_code: bool = False) -> None:
    """A folder we can chat with: config.json of a causal LM, not a dschat reward model, and no
    model code of its own unless --trust-remote-code."""
    from dschat_cli.models.loading import check_remote_code, read_config_json

    p = Path(path).expanduser()
    if not p.exists():
        if path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise ConfigError(flag, f"folder {path} not found")
        return  # a hub id; from_pretrained reports it
    if not (p / "config.json").is_file():
        raise ConfigError(flag, f"{path} has no config.json; give a model folder saved by dschat or "
                          "save_pretrained")
    cfg = read_config_json(p, flag)
    if cfg.get("dschat_role") == "reward":
        raise ConfigError(flag, f"{path} is a dschat reward model, not a causal LM; use `dschat "
                          "eval-reward --path` for it, or give an actor folder")
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise ConfigError(flag, f"{path} holds a {archs[0]}, not a causal language model")
    check_remote_code(cfg, path, trust=trust_remote_code, flag=flag)


def load_for_inference(path: str, *, device: str, dtype, flag: str,
                       trust_remote_code: bool = False):
    """-> (model in eval mode on device, tokenizer with left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_causal_lm_dir(path, flag, trust_remote_code=trust_remote_code)
    try:  # trust_remote_code always explicit: None would make transformers ask on stdin
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: e.g. a hub model that needs its own code
        lines = str(e).strip().splitlines()
        hint = " (pass --trust-remote-code if you trust its code)" \
            if "trust_remote_code" in str(e) else ""
        raise ConfigError(flag, f"cannot load '{path}': {lines[0] if lines else type(e).__name__}"
                          f"{hint}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(device).eval()
    return model, tok


def generation_kwargs(gen: GenerationOptions, tokenizer) -> dict:
    kw = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
              repetition_penalty=gen.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, stop_strings=STOP_STRINGS, tokenizer=tokenizer)
    if gen.do_sample:
        kw.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def clean_answer(text: str) -> str:
    """Cut at the start of the next turn; trim whitespace."""
    for stop in STOP_STRINGS:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text.strip()


def generate_answers(model, tokenizer, prompts: list[str], gen: GenerationOptions,
                     batch_size: int = 8) -> list[str]:
    import torch

    answers: list[str] = []
    kw = generation_kwargs(gen, tokenizer)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new:
            answers.append(clean_answer(tokenizer.decode(row, skip_special_tokens=True)))
    return answers
