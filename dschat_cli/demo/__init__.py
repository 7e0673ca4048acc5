"""The built-in offline demo: a synthetic preference data set on which SFT, reward model training and
PPO show visible learning with tiny models on a CPU, and its known true reward."""

from dschat_cli.demo.judge import judge, true_reward
from dschat_cli.demo.synthetic import demo_corpus, make_pairs, write_jsonfile_dir

__all__ = ["demo_corpus", "judge", "make_pairs", "true_reward", "write_jsonfile_dir"]
