"""LAMBADA: predict the last word of a passage (Paperno et al. 2016).

Default data: OpenAI's detokenized test set (`scenarios/data/lambada/lambada_test.jsonl`, 5153 passages,
`{"text": ...}` per line), the version GPT-2 and lm-evaluation-harness (`lambada_openai`) use. As in
lm-evaluation-harness, a passage splits at its last space: context = the text before it, target = the
last word, and the model must continue the context with " " + target.

Other sources (`path=` or `dataset=`, not both):
- `path`: a local `.jsonl` (a string field `text_field`, default "text", per line) or `.txt` (one
  passage per non-blank line, trailing whitespace dropped);
- `dataset`: anything `datasets.load_dataset(dataset, dataset_config, split=split)` opens offline (a
  local folder or loading script, or a dataset already in the Hugging Face cache), field `text_field`.

Every instance is a test instance with one correct reference (the target). The two evaluation methods
(`scenarios.run_specs.lambada_run_spec`) adapt the same instances differently; see
`scenarios.lambada_metrics`.
"""

from __future__ import annotations

import os
from pathlib import Path

from helm.benchmark.scenarios.scenario import (
    CORRECT_TAG,
    TEST_SPLIT,
    Input,
    Instance,
    Output,
    Reference,
    Scenario,
    ScenarioMetadata,
)

from scenarios.arguments import as_optional_str
from scenarios.data_files import SHIPPED_DATA_DIR, read_jsonl_field, require_file
from scenarios.errors import ScenarioArgumentError, ScenarioDataError

SHIPPED_LAMBADA = SHIPPED_DATA_DIR / "lambada" / "lambada_test.jsonl"


def split_passage(text: str) -> tuple[str, str]:
    """(context, target): the passage split at its last space (lm-evaluation-harness's `lambada_openai`)."""
    context, space, target = text.rpartition(" ")
    if not space or not context or not target:
        raise ValueError("a passage needs a context, a space and a last word")
    return context, target


def make_instance(text: str) -> Instance:
    context, target = split_passage(text)
    return Instance(
        input=Input(text=context),
        references=[Reference(Output(text=target), tags=[CORRECT_TAG])],
        split=TEST_SPLIT,
    )


class LambadaScenario(Scenario):
    """Last-word prediction; see the module docstring for sources and the context/target split."""

    name = "lambada"
    description = "LAMBADA last-word prediction (OpenAI's detokenized test set by default)"
    tags = ["language_modeling", "cloze"]

    def __init__(
        self,
        path: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "test",
        text_field: str = "text",
    ):
        super().__init__()
        self.path = as_optional_str(self.name, "path", path)
        self.dataset = as_optional_str(self.name, "dataset", dataset)
        self.dataset_config = as_optional_str(self.name, "dataset_config", dataset_config)
        self.split = as_optional_str(self.name, "split", split) or "test"
        self.text_field = as_optional_str(self.name, "text_field", text_field) or "text"
        if self.path and self.dataset:
            raise ScenarioArgumentError("lambada: give path= or dataset=, not both")
        if self.path and Path(self.path).suffix not in (".jsonl", ".json", ".txt"):
            raise ScenarioArgumentError(f"lambada: path must be a .jsonl or .txt file, got {self.path!r}")

    def get_instances(self, output_path: str) -> list[Instance]:
        origin, passages = self._read_passages(output_path)
        instances = []
        for i, text in enumerate(passages, start=1):
            try:
                instances.append(make_instance(text))
            except ValueError as e:
                raise ScenarioDataError(f"{origin}, passage {i}: {e}: {text[-60:]!r}") from e
        if not instances:
            raise ScenarioDataError(f"{origin}: no passages")
        return instances

    def _read_passages(self, output_path: str) -> tuple[str, list[str]]:
        """(where the passages came from, for messages; the passages)."""
        if self.dataset:
            return f"dataset {self.dataset!r} split {self.split!r}", self._load_dataset(output_path)
        path = require_file(self.path, "lambada path=") if self.path else SHIPPED_LAMBADA
        if path.suffix == ".txt":
            with open(path, encoding="utf-8") as f:
                return str(path), [line.rstrip() for line in f if line.strip()]
        return str(path), read_jsonl_field(path, self.text_field)

    def _load_dataset(self, output_path: str) -> list[str]:
        import datasets  # heavy; only this source needs it

        try:
            data = datasets.load_dataset(
                self.dataset,
                self.dataset_config,
                split=self.split,
                cache_dir=os.path.join(output_path, "hf_datasets"),
            )
        except Exception as e:  # datasets raises many types; all mean "cannot open this source offline"
            raise ScenarioDataError(
                f"lambada: datasets.load_dataset({self.dataset!r}, {self.dataset_config!r}, split={self.split!r}) "
                f"failed offline ({type(e).__name__}: {e}); give a local folder or a dataset already in the "
                "Hugging Face cache"
            ) from e
        if self.text_field not in data.column_names:
            raise ScenarioDataError(
                f"lambada: dataset {self.dataset!r} has no column {self.text_field!r} (columns: {data.column_names})"
            )
        return list(data[self.text_field])

    def get_metadata(self) -> ScenarioMetadata:
        return ScenarioMetadata(
            name="lambada",
            display_name="LAMBADA",
            description="Last-word prediction on LAMBADA (OpenAI's detokenized test set), as in "
            "lm-evaluation-harness's lambada_openai.",
            main_metric="lambada_accuracy",
            main_split="test",
        )
