"""`dschat eval` config: the same prompts through a baseline and a fine-tuned model."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.schema import ConfigError, opt, section


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = opt(128, "Maximum tokens generated per answer.", min=1)
    do_sample: bool = opt(False, "Sample instead of greedy decoding.")
    temperature: float = opt(1.0, "Sampling temperature (with --do-sample).", min=1e-4)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much "
                       "probability (with --do-sample).", min=0.0, max=1.0)
    top_k: int = opt(0, "Sample from the k most likely tokens (0: no limit; with --do-sample).",
                     min=0)
    num_beams: int = opt(1, "Beam search width (1: none).", min=1)
    repetition_penalty: float = opt(1.0, "Penalty > 1 discourages repeated tokens.", min=0.0)


@dataclass(frozen=True)
class InferenceOptions:
    device: str = opt("auto", "Where to run: auto (GPU if present), cuda, cuda:N or cpu.")
    dtype: str = opt("auto", "Weights precision: auto (bf16 on GPUs that support it, fp16 on "
                     "other GPUs, fp32 on CPU), bf16, fp16 or fp32.",
                     choices=("auto", "bf16", "fp16", "fp32"))
    batch_size: int = opt(8, "Prompts per generate call.", min=1)
    seed: int = opt(1234, "Random seed for sampling.")
    trust_remote_code: bool = opt(False, "Run the Python code a model folder or hub repo ships "
                                  "for an architecture transformers lacks (config.json auto_map). "
                                  "A security risk: that code runs with your permissions; give it "
                                  "only for models you trust. Without it such a model is refused.")


@dataclass(frozen=True)
class EvalConfig:
    baseline: str | None = opt(None, "Baseline model: hub id or folder (e.g. the pretrained model).")
    finetuned: str | None = opt(None, "Fine-tuned model folder (e.g. OUT/actor-models/1.3b).")
    prompts: str | None = opt(None, "Text file with one prompt per line, or a .json list / .jsonl "
                              "of {\"prompt\": ...}; default: six built-in prompts. Plain questions "
                              "are wrapped as ' Human: {q} Assistant:'.")
    output_file: str | None = opt(None, "Also write the answers as JSON lines to this file.")
    reward_model: str | None = opt(None, "Score every answer with this reward model (a `dschat "
                                   "reward` output folder): each answer's score in the table, the "
                                   "mean score of each side with its standard error, and the "
                                   "fine-tuned model's win rate over the baseline.")
    generation: GenerationOptions = section(GenerationOptions, panel="Generation")
    inference: InferenceOptions = section(InferenceOptions, panel="Inference")

    def check(self) -> None:
        if not self.baseline and not self.finetuned:
            raise ConfigError("--finetuned", "give --finetuned (and --baseline to compare), or "
                              "--baseline alone")
