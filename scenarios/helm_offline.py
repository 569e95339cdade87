"""Feed HELM's own scenarios from local files: HELM's downloads, served offline.

HELM scenarios fetch their data with `helm.common.general.ensure_file_downloaded(source_url,
target_path, ...)`, which returns at once when `target_path` exists. `install()` replaces that function
(in `helm.common.general` and in every already-imported `helm.*` module that imported it by name) with
`offline_ensure_file_downloaded`, which never touches the network:

1. MMLU's `data.tar` is built in place: HELM's unpacked layout `<target>/{dev,val,test}/<subject>_<split>.csv`
   (header-less rows `question,A,B,C,D,letter`) from the shipped subjects (`scenarios/data/mmlu`:
   header row, answers 0-3; abstract_algebra and us_foreign_policy) and any subject in
   `$FLEXHELM_DATA/mmlu/{dev,val,test}/<subject>_<split>.csv` (either format; e.g. the unpacked data.tar).
   A folder we built is topped up with newly placed subjects on every call (all subjects share one cache
   folder). MMLU reads no file for an unknown subject and would return zero instances, so `install()`
   also makes `MMLUScenario.get_instances` raise `ScenarioDataError` naming the files to place then.
2. Otherwise, if `target_path` exists, return (as HELM does).
3. Otherwise copy the local file for that URL (`local_source`) into place, treating it like the download
   (unpacked / gunzipped as HELM would; a folder stands for an already-unpacked archive):
   - WikiFact `.../blob/{train,dev,test}.jsonl` -> `$FLEXHELM_DATA/wikifact/{train,dev,test}.jsonl`;
   - XSUM / CNN-DM `xsum.pk`, `xsum-sampled.pk` -> `$FLEXHELM_DATA/xsum/`, `cnndm.pk` -> `$FLEXHELM_DATA/cnndm/`;
   - any other URL -> `$FLEXHELM_DATA/downloads/<last part of the URL path>`.
4. No local file: `ScenarioDataError` naming the URL, the file to place, where, and its format.

`synthetic_reasoning` and `synthetic_reasoning_natural` generate their instances and download nothing.
`ScenarioDataError` is a `ValueError`, which HELM's summarization metric catches for its optional
QAFactEval / human-evaluation score files: offline those are skipped, as for any model HELM did not score.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock

from scenarios.data_files import DATA_DIR_ENV, SHIPPED_DATA_DIR, user_data_dir
from scenarios.errors import ScenarioDataError

MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
WIKIFACT_URL_PREFIX = "https://worksheets.codalab.org/rest/bundles/0x8c3b60eb7c6b462e822a150f194d3b35/contents/blob/"
SUMMARIZATION_URL_PREFIX = (
    "https://storage.googleapis.com/crfm-helm-public/source_datasets/scenarios/summarization_scenario/"
)
MMLU_SPLITS = ("dev", "val", "test")
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
BUILT_MARKER = ".flexhelm-offline"
"""File in an MMLU folder built by us (topped up on later calls; a real download is left alone)."""

_FORMATS = {
    "wikifact": "HELM's WikiFact jsonl as served by CodaLab: one object per line with 'property' (e.g. P31), "
    "'template' and 'result_names'",
    "xsum": "HELM's pickle: a dict {'train', 'validation', 'test'} of lists of {'document', 'summary'} dicts",
    "cnndm": "HELM's pickle: a dict {'train', 'validation', 'test'} of lists of {'article', 'highlights'} dicts",
    "downloads": "the file at that URL, unchanged (or, for an archive HELM unpacks, the unpacked folder)",
}

_state: dict = {"ensure": None, "mmlu_get_instances": None, "data_dir": None}
"""What `install()` replaced (restored by `uninstall()`) and an explicit data folder, if one was given."""


def offline_data_dir() -> Path:
    """The user data folder in use: `install(data_dir=...)`, else `$FLEXHELM_DATA`, else the default."""
    return Path(_state["data_dir"]) if _state["data_dir"] else user_data_dir()


def local_source(source_url: str) -> tuple[Path, str]:
    """(the local file standing for `source_url`, a description of its format)."""
    name = [part for part in urlparse(source_url).path.split("/") if part][-1]
    if source_url.startswith(WIKIFACT_URL_PREFIX):
        folder = "wikifact"
    elif source_url.startswith(SUMMARIZATION_URL_PREFIX):
        folder = "cnndm" if name.startswith("cnndm") else "xsum"
    else:
        folder = "downloads"
    return offline_data_dir() / folder / name, _FORMATS[folder]


def offline_ensure_file_downloaded(
    source_url: str,
    target_path: str,
    unpack: bool = False,
    downloader_executable: str | None = None,
    unpack_type: str | None = None,
) -> None:
    """Drop-in for HELM's `ensure_file_downloaded` that serves local files (module docstring)."""
    with FileLock(f"{target_path}.lock"):  # same lock as HELM's: parallel workers share output folders
        if source_url == MMLU_URL:
            build_mmlu_folder(Path(target_path))
            return
        if os.path.exists(target_path):
            return
        source, described = local_source(source_url)
        if not source.exists():
            raise ScenarioDataError(
                f"HELM wants {source_url} (for {target_path}), and flexhelm never downloads: place {source} "
                f"({described}); the folder is ${DATA_DIR_ENV} (now {offline_data_dir()})"
            )
        _place(source, Path(target_path), source_url, unpack, unpack_type)


def _place(source: Path, target: Path, source_url: str, unpack: bool, unpack_type: str | None) -> None:
    """Put `source` at `target` the way HELM puts a download there (via a temporary name)."""
    tmp = target.with_name(target.name + ".tmp")
    if source.is_dir():
        shutil.copytree(source, tmp)
    elif unpack:
        formats = {"untar": "tar", "unzip": "zip"}
        shutil.unpack_archive(source, tmp, format=formats.get(unpack_type or "", None))
        entries = os.listdir(tmp)
        if len(entries) == 1:  # HELM keeps the single top-level entry of an archive, not the archive root
            os.rename(tmp / entries[0], target)
            os.rmdir(tmp)
            return
    elif source_url.endswith(".gz") and not target.name.endswith(".gz"):
        with gzip.open(source, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    elif source_url.endswith(".zst") and not target.name.endswith(".zst"):
        import zstandard  # a HELM dependency

        with open(source, "rb") as fin, open(tmp, "wb") as fout:
            zstandard.ZstdDecompressor().copy_stream(fin, fout)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def mmlu_sources() -> list[Path]:
    """Folders holding `{dev,val,test}/<subject>_<split>.csv`, the user's first (it wins over shipped)."""
    return [offline_data_dir() / "mmlu", SHIPPED_DATA_DIR / "mmlu"]


def build_mmlu_folder(target: Path) -> None:
    """Create (or top up) HELM's unpacked MMLU folder at `target` from the local CSVs."""
    if target.exists() and not (target / BUILT_MARKER).exists():
        return  # a real data.tar unpacked by HELM, or by the user: use as is
    for split in MMLU_SPLITS:
        for source_dir in mmlu_sources():
            for source in sorted((source_dir / split).glob(f"*_{split}.csv")):
                destination = target / split / source.name
                if not destination.exists():
                    convert_mmlu_csv(source, destination)
    target.mkdir(parents=True, exist_ok=True)
    (target / BUILT_MARKER).touch()


def convert_mmlu_csv(source: Path, destination: Path) -> None:
    """Copy an MMLU CSV into HELM's format: no header, answer as a letter A-D.

    Reads either that format or the shipped one (header row `question,choice0..3,answer`, answer 0-3).
    """
    rows: list[list[str]] = []
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if reader.line_num == 1 and row == MMLU_HEADER:
                continue
            if len(row) != 6:
                raise ScenarioDataError(
                    f"{source}:{reader.line_num}: expected 6 columns (question, 4 choices, answer), got {len(row)}"
                )
            answer = row[5].strip()
            if answer in ("0", "1", "2", "3"):
                answer = "ABCD"[int(answer)]
            if answer not in ("A", "B", "C", "D"):
                raise ScenarioDataError(f"{source}:{reader.line_num}: answer must be 0-3 or A-D, got {row[5]!r}")
            rows.append(row[:5] + [answer])
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, destination)


def _checked_mmlu_get_instances(scenario, output_path: str):
    """HELM's `MMLUScenario.get_instances`, but an unknown subject is an error instead of zero instances."""
    instances = _state["mmlu_get_instances"](scenario, output_path)
    if not any(instance.split == "test" for instance in instances):
        subject = scenario.subject
        shipped = sorted(p.name[: -len("_test.csv")] for p in (SHIPPED_DATA_DIR / "mmlu" / "test").glob("*_test.csv"))
        user = offline_data_dir() / "mmlu"
        raise ScenarioDataError(
            f"mmlu: no test questions for subject {subject!r}. flexhelm ships {', '.join(shipped)}; for another "
            f"subject place {user / 'test' / f'{subject}_test.csv'} and {user / 'dev' / f'{subject}_dev.csv'} "
            "(the 5 in-context examples), in HELM's format (the unpacked data.tar: rows question,A,B,C,D,letter) "
            "or the shipped one (header, answers 0-3)"
        )
    return instances


def install(data_dir: str | os.PathLike | None = None) -> None:
    """Serve HELM's downloads from local files (module docstring). Idempotent; `uninstall()` undoes it.

    `data_dir` overrides `$FLEXHELM_DATA` for HELM's files that are not shipped.
    """
    import helm.common.general as general
    from helm.benchmark.scenarios.mmlu_scenario import MMLUScenario

    _state["data_dir"] = os.fspath(data_dir) if data_dir is not None else None
    if _state["ensure"] is None:
        _state["ensure"] = general.ensure_file_downloaded
        _state["mmlu_get_instances"] = MMLUScenario.get_instances
    _rebind(_state["ensure"], offline_ensure_file_downloaded)
    MMLUScenario.get_instances = _checked_mmlu_get_instances


def uninstall() -> None:
    """Put HELM's own `ensure_file_downloaded` (and `MMLUScenario.get_instances`) back."""
    if _state["ensure"] is None:
        return
    from helm.benchmark.scenarios.mmlu_scenario import MMLUScenario

    _rebind(offline_ensure_file_downloaded, _state["ensure"])
    MMLUScenario.get_instances = _state["mmlu_get_instances"]
    _state.update(ensure=None, mmlu_get_instances=None, data_dir=None)


def is_installed() -> bool:
    import helm.common.general as general

    return general.ensure_file_downloaded is offline_ensure_file_downloaded


def _rebind(old, new) -> None:
    """Point `helm.common.general` and every loaded `helm.*` module that imported `old` by name at `new`."""
    for name, module in list(sys.modules.items()):
        if (name == "helm" or name.startswith("helm.")) and getattr(module, "ensure_file_downloaded", None) is old:
            module.ensure_file_downloaded = new
