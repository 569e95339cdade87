"""Synthetic throughput workload: N prompts of a fixed length, answered with a fixed number of tokens.

FlexGen's benchmark workload (prompt 512, output 32 in the paper) as a HELM scenario, separate from
HELM's `synthetic_efficiency` (which needs its own downloaded prompt files). The text is meaningless on
purpose; only lengths matter.

Prompt length. A prompt is `prompt_len` words drawn (seeded, so every prompt differs and runs repeat)
from the 64 most frequent lowercase words of the shipped WikiText-2 test text ("the", "of", "and", ...),
joined by single spaces. Each of those words is one GPT-2/OPT BPE token with or without its leading
space (checked against GPT-2's tokenizer), so a prompt is exactly `prompt_len` tokens for GPT-2-family
tokenizers (plus the BOS a backend adds) and close to it for other subword vocabularies.
The output length is the adapter's `max_tokens` (`scenarios.run_specs.synthetic_run_spec`).
"""

from __future__ import annotations

import random
from collections import Counter

from helm.benchmark.scenarios.scenario import TEST_SPLIT, Input, Instance, Scenario, ScenarioMetadata

from scenarios.arguments import as_int
from scenarios.data_files import SHIPPED_WIKITEXT

NUM_WORDS = 64
"""Vocabulary size: the most frequent words only, so that each is a single token."""


def frequent_words(text: str, count: int = NUM_WORDS) -> list[str]:
    """The `count` most frequent lowercase ASCII words of `text` (ties in order of first appearance)."""
    counts = Counter(w for w in text.split() if w.isascii() and w.isalpha() and w.islower())
    return [word for word, _ in counts.most_common(count)]


class SyntheticScenario(Scenario):
    """`num_prompts` prompts of `prompt_len` (single-token) words each; see the module docstring."""

    name = "synthetic"
    description = "Fixed prompt length / output length prompts for throughput (FlexGen's benchmark workload)"
    tags = ["efficiency"]

    def __init__(self, num_prompts: int, prompt_len: int, seed: int = 0):
        super().__init__()
        self.num_prompts = as_int(self.name, "num_prompts", num_prompts, minimum=1)
        self.prompt_len = as_int(self.name, "prompt_len", prompt_len, minimum=1)
        self.seed = as_int(self.name, "seed", seed)

    def get_instances(self, output_path: str) -> list[Instance]:
        with open(SHIPPED_WIKITEXT["test"], encoding="utf-8") as f:
            words = frequent_words(f.read())
        rng = random.Random(self.seed)
        return [
            Instance(
                input=Input(text=" ".join(rng.choice(words) for _ in range(self.prompt_len))),
                references=[],
                split=TEST_SPLIT,
            )
            for _ in range(self.num_prompts)
        ]

    def get_metadata(self) -> ScenarioMetadata:
        return ScenarioMetadata(
            name="synthetic",
            display_name="Synthetic throughput",
            description="N prompts of a fixed token length, each answered with a fixed number of tokens.",
            main_metric="inference_runtime",
            main_split="test",
        )
