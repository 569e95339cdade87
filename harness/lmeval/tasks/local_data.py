"""Datasets of the shipped tasks, read from the files flexhelm ships (`scenarios/data/`), never the hub.

lm-eval calls a task's `custom_dataset` with the task's metadata (and the run's model arguments) as keywords;
these take none of them.
"""

from datasets import Dataset, DatasetDict

from scenarios.data_files import SHIPPED_DATA_DIR, SHIPPED_WIKITEXT, read_jsonl_field, split_articles


def lambada_openai(**_) -> DatasetDict:
    """The 5153 LAMBADA test passages of OpenAI's detokenized version (EleutherAI/lambada_openai `default`)."""
    texts = read_jsonl_field(SHIPPED_DATA_DIR / "lambada" / "lambada_test.jsonl", "text")
    return DatasetDict({"test": Dataset.from_dict({"text": texts})})


def wikitext_2(**_) -> DatasetDict:
    """WikiText-2 raw test and validation articles as documents (`page`), the shape of
    EleutherAI/wikitext_document_level `wikitext-2-raw-v1`: 62 test articles, split at ` = Title = ` lines."""
    splits = {"test": "test", "validation": "valid"}
    return DatasetDict({name: Dataset.from_dict({"page": split_articles(SHIPPED_WIKITEXT[key].read_text("utf-8"))})
                        for name, key in splits.items()})
