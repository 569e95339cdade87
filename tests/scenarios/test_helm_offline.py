"""HELM's own scenarios fed offline: MMLU built from the shipped CSVs, user files, clear errors."""

from __future__ import annotations

import csv
import shutil

import pytest

from scenarios import helm_offline
from scenarios.errors import ScenarioDataError
from tests.scenarios.conftest import FIXTURES


def _mmlu(subject, output_path):
    from helm.benchmark.scenarios.mmlu_scenario import MMLUScenario

    return MMLUScenario(subject=subject).get_instances(str(output_path))


def test_install_replaces_download_everywhere_and_uninstall_restores(offline_helm):
    import helm.benchmark.scenarios.mmlu_scenario as mmlu
    import helm.common.general as general

    assert helm_offline.is_installed()
    assert mmlu.ensure_file_downloaded is helm_offline.offline_ensure_file_downloaded
    helm_offline.uninstall()
    assert not helm_offline.is_installed() and mmlu.ensure_file_downloaded is general.ensure_file_downloaded
    helm_offline.install()  # the fixture uninstalls again


def test_mmlu_from_shipped_csvs_is_what_helm_reads(offline_helm, tmp_path):
    instances = _mmlu("abstract_algebra", tmp_path / "mmlu")
    test = [i for i in instances if i.split == "test"]
    train = [i for i in instances if i.split == "train"]
    assert (len(test), len(train)) == (100, 5)
    # Shipped row 1: "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", 0,1,2,3, answer 1 -> B -> "1".
    first = train[0]
    assert first.input.text.startswith("Find all c in Z_3")
    assert [r.output.text for r in first.references] == ["0", "1", "2", "3"]
    assert [r.output.text for r in first.references if r.is_correct] == ["1"]
    with open(tmp_path / "mmlu" / "data" / "dev" / "abstract_algebra_dev.csv", newline="") as f:
        assert next(csv.reader(f))[-1] == "B"  # HELM's format: no header, letter answers
    # Same cache folder, other shipped subject (quoted multi-line fields survive the conversion).
    assert len([i for i in _mmlu("us_foreign_policy", tmp_path / "mmlu") if i.split == "test"]) == 100


def test_mmlu_subject_placed_later_is_added_and_unknown_subject_is_an_error(offline_helm, tmp_path):
    output = tmp_path / "mmlu"
    _mmlu("abstract_algebra", output)
    with pytest.raises(ScenarioDataError, match=r"no test questions for subject 'anatomy'.*anatomy_test\.csv"):
        _mmlu("anatomy", output)
    for split, letter in (("dev", "A"), ("test", "D")):
        folder = offline_helm / "mmlu" / split
        folder.mkdir(parents=True)
        (folder / f"anatomy_{split}.csv").write_text(f"What is the femur?,a bone,a nerve,a muscle,an organ,{letter}\n")
    instances = _mmlu("anatomy", output)
    assert [i.split for i in instances] == ["train", "test"]
    assert [r.output.text for r in instances[1].references if r.is_correct] == ["an organ"]


def test_malformed_mmlu_row_names_file_and_line(offline_helm, tmp_path):
    folder = offline_helm / "mmlu" / "test"
    folder.mkdir(parents=True)
    (folder / "anatomy_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,7\n")
    with pytest.raises(ScenarioDataError, match=r"anatomy_test\.csv:2: answer must be 0-3 or A-D"):
        _mmlu("anatomy", tmp_path / "mmlu")


def test_wikifact_from_user_folder(offline_helm, tmp_path):
    from helm.benchmark.scenarios.wikifact_scenario import WIKIFactScenario

    shutil.copytree(FIXTURES / "wikifact", offline_helm / "wikifact")
    plaintiff = WIKIFactScenario(subject="plaintiff").get_instances(str(tmp_path / "wikifact"))
    assert sorted(i.split for i in plaintiff) == ["test", "train", "train", "valid"]
    assert [r.output.text for r in plaintiff[0].references] == ["Norma McCorvey", "Jane Roe"]
    instance_of = WIKIFactScenario(subject="instance_of").get_instances(str(tmp_path / "wikifact"))
    assert len([i for i in instance_of if i.split == "test"]) == 2


def test_missing_user_file_names_url_file_and_format(offline_helm, tmp_path):
    from helm.benchmark.scenarios.wikifact_scenario import WIKIFactScenario

    expected = offline_helm / "wikifact" / "train.jsonl"
    with pytest.raises(ScenarioDataError, match=rf"codalab.*place {expected} \(HELM's WikiFact jsonl"):
        WIKIFactScenario(subject="plaintiff").get_instances(str(tmp_path / "wikifact"))


def test_xsum_sampled_from_user_folder(offline_helm, tmp_path):
    from helm.benchmark.scenarios.summarization_scenario import SummarizationScenario

    shutil.copytree(FIXTURES / "xsum", offline_helm / "xsum")
    scenario = SummarizationScenario(
        dataset_name="xsum-sampled", sampling_min_length=50, sampling_max_length=150, doc_max_length=512
    )
    instances = scenario.get_instances(str(tmp_path / "xsum"))
    assert sorted(i.split for i in instances) == ["test", "test", "train", "train", "train", "valid"]


def test_other_urls_come_from_the_downloads_folder(offline_helm, tmp_path):
    url = "https://example.org/files/thing.json.gz?x=1"
    assert helm_offline.local_source(url)[0] == offline_helm / "downloads" / "thing.json.gz"
    with pytest.raises(ScenarioDataError, match="downloads/thing.json.gz"):
        helm_offline.offline_ensure_file_downloaded(url, str(tmp_path / "thing.json"))
    import gzip

    (offline_helm / "downloads").mkdir()
    with gzip.open(offline_helm / "downloads" / "thing.json.gz", "wt") as f:
        f.write("{}")
    helm_offline.offline_ensure_file_downloaded(url.split("?")[0], str(tmp_path / "thing.json"))
    assert (tmp_path / "thing.json").read_text() == "{}"  # gunzipped, as HELM does


def test_synthetic_reasoning_scenarios_download_nothing(offline_helm, tmp_path):
    # Any download would fail here (empty user folder); the generators need none and write nothing.
    from helm.benchmark.scenarios.synthetic_reasoning_natural_scenario import SRNScenario
    from helm.benchmark.scenarios.synthetic_reasoning_scenario import SyntheticReasoningScenario

    assert SRNScenario(difficulty="easy").get_instances(str(tmp_path))
    assert SyntheticReasoningScenario(mode="pattern_match").get_instances(str(tmp_path))
    assert list(tmp_path.iterdir()) == [offline_helm]
