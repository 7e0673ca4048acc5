"""`dschat eval-reward` config: score chosen/rejected answers (or single answers) with a reward
model."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.eval import InferenceOptions
from dschat_cli.config.schema import ConfigError, opt, section


@dataclass(frozen=True)
class EvalRewardConfig:
    path: str | None = opt(None, "Reward model folder written by `dschat reward`.")
    prompt: tuple[str, ...] = opt((), "Prompt, repeatable; plain questions are wrapped as ' Human: "
                                  "{q} Assistant:'. With --chosen/--rejected: one pair per "
                                  "--prompt; with --answer: one score per --prompt.")
    chosen: tuple[str, ...] = opt((), "Preferred answer for the matching --prompt, repeatable.")
    rejected: tuple[str, ...] = opt((), "Dispreferred answer for the matching --prompt, "
                                    "repeatable.")
    answer: tuple[str, ...] = opt((), "Single-answer mode: an answer to score for the matching "
                                  "--prompt, repeatable.")
    data_path: tuple[str, ...] = opt((), "Score the eval part of these sources (as in `dschat "
                                     "reward --data-path`); default: the data the model was trained "
                                     "on, from its run_config.yaml (its held-out pairs).")
    data_dir: str | None = opt(None, "Folder with train.json/eval.json for --data-path "
                               "local/jsonfile.")
    data_split: str | None = opt(None, "Split of the sources (default: the model's own, else "
                                 "2,4,4); the step-2 part's eval rows are scored.")
    max_pairs: int = opt(0, "Score at most this many pairs (0: all).", min=0)
    max_seq_len: int | None = opt(None, "Token limit of prompt + answer (default: the model's "
                                  "training value, else 512).", min=8)
    show: int = opt(20, "Pairs shown in the table (all are scored).", min=0)
    output_file: str | None = opt(None, "Also write every scored pair as JSON lines to this file.")
    inference: InferenceOptions = section(InferenceOptions, panel="Inference")

    def check(self) -> None:
        if not self.path:
            raise ConfigError("--path", "is required (a folder written by `dschat reward`)")
        n = len(self.prompt)
        if self.answer:
            if self.chosen or self.rejected:
                raise ConfigError("--answer", "scores single answers; do not mix it with "
                                  "--chosen/--rejected")
            if len(self.answer) != n:
                raise ConfigError("--answer", f"give one --answer per --prompt ({n} prompts, "
                                  f"{len(self.answer)} answers)")
        elif self.chosen or self.rejected or self.prompt:
            if not (len(self.chosen) == len(self.rejected) == n):
                raise ConfigError("--chosen", f"give one --chosen and one --rejected per --prompt "
                                  f"({n} prompts, {len(self.chosen)} chosen, {len(self.rejected)} "
                                  "rejected)")
        if (self.prompt or self.answer) and self.data_path:
            raise ConfigError("--data-path", "score either a dataset or --prompt pairs, not both")
