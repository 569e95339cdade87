"""flexhelm's HELM plugin: makes `helm-run` offline and registers local checkpoints as HELM models.

HELM loads it in two ways: `helm-run --plugins harness.helm.plugin ...`, or on its own through the
`helm` entry point in pyproject.toml (every `helm-run` imports every installed entry point). HELM's plugin
contract is that importing the module registers things, so the last line calls `register()`.

Models registered:
- `flexhelm/opt-ref`, the shipped reference model, when `<repo>/models/flexhelm-opt-ref` exists;
- every `name=/path/to/folder` of `FLEXHELM_MODELS="name=/path,name2=/path2"`, as `flexhelm/<name>`.
Optional: `FLEXHELM_POLICY` (a runtime Policy as JSON, a JSON file, or `auto`: planned by the cost model when
the model loads; unset: `$FLEXHELM_DEFAULT_POLICY`, by default `auto`), `FLEXHELM_OFFLOAD_DIR`,
`FLEXHELM_MAX_BATCH` (largest batch handed to the engine, default 256).

Example: `FLEXHELM_MODELS=opt-1.3b=~/models/opt-1.3b helm-run --plugins harness.helm.plugin \\
  -r mmlu:subject=abstract_algebra,model=flexhelm/opt-1.3b --suite S -m 100 -n 64`
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
from datetime import date
from pathlib import Path

from harness.helm import env

REPO = Path(__file__).resolve().parents[2]
REFERENCE_MODELS = {"opt-ref": REPO / "models" / "flexhelm-opt-ref"}
ORGANIZATION = "flexhelm"
SCENARIO_MODULES = ("scenarios.helm_offline", "scenarios.run_specs")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                    "tokenizer_config.json", "special_tokens_map.json")


class PluginError(RuntimeError):
    """The plugin's configuration (environment variables, model folders, scenario modules) is wrong."""


def register() -> list[str]:
    """Prepare the environment, load flexhelm's scenarios and register every configured model; returns their names."""
    env.prepare()
    load_scenarios()
    policy = os.environ.get("FLEXHELM_POLICY") or None
    offload_dir = os.environ.get("FLEXHELM_OFFLOAD_DIR") or None
    max_batch = _positive_int("FLEXHELM_MAX_BATCH")
    models = {name: folder for name, folder in REFERENCE_MODELS.items() if (folder / "config.json").is_file()}
    models.update(models_from_env(os.environ.get("FLEXHELM_MODELS", "")))
    return [register_model(name, folder, policy, offload_dir, max_batch) for name, folder in models.items()]


def load_scenarios() -> list[str]:
    """Import flexhelm's scenario modules (run-spec functions; offline data for HELM's scenarios)."""
    from helm.common.hierarchical_logger import hlog

    loaded = []
    for name in SCENARIO_MODULES:
        if importlib.util.find_spec(name) is None:
            hlog(f"flexhelm: {name} is not there yet; its scenarios and offline data are unavailable")
            continue
        try:
            module = importlib.import_module(name)
            if hasattr(module, "install"):
                module.install()
        except Exception as e:
            raise PluginError(f"{name} failed to load ({type(e).__name__}: {e}); flexhelm's HELM plugin needs it "
                              "to run its scenarios offline") from e
        loaded.append(name)
    return loaded


def models_from_env(value: str) -> dict[str, Path]:
    """Parse `name=/path,name2=/path2` (FLEXHELM_MODELS) into {name: folder}, checking each folder."""
    models: dict[str, Path] = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or not path:
            raise PluginError(f"FLEXHELM_MODELS entry {entry!r} is not name=/path/to/folder "
                              "(name: letters, digits, '.', '_', '-')")
        if name in models:
            raise PluginError(f"FLEXHELM_MODELS names {name!r} twice")
        folder = Path(path).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise PluginError(f"FLEXHELM_MODELS: {folder} (for {name!r}) is not a checkpoint folder with config.json")
        models[name] = folder
    return models


def register_model(name: str, folder: str | os.PathLike, policy: str | None = None, offload_dir: str | None = None,
                   max_batch: int | None = None) -> str:
    """Register `flexhelm/<name>` (metadata, deployment, tokenizer) for the checkpoint in `folder`."""
    from helm.benchmark.model_deployment_registry import (
        DEPLOYMENT_NAME_TO_MODEL_DEPLOYMENT,
        ClientSpec,
        ModelDeployment,
        register_model_deployment,
    )
    from helm.benchmark.model_metadata_registry import (
        FULL_FUNCTIONALITY_TEXT_MODEL_TAG,
        TEXT_MODEL_TAG,
        ModelMetadata,
        register_model_metadata,
    )
    from helm.benchmark.tokenizer_config_registry import TokenizerConfig, TokenizerSpec, register_tokenizer_config

    from harness.helm.backend import policy_from
    from harness.helm.client import CLIENT_CLASS

    folder = Path(folder).expanduser().resolve()
    model = f"{ORGANIZATION}/{name}"
    args: dict = {"model_dir": str(folder)}
    if policy == "auto":  # planned when the backend loads (it needs the hardware profile)
        args["policy"] = policy
    elif policy:
        args["policy"] = json.dumps(policy_from(policy).to_json(), sort_keys=True)  # validated now, not mid-run
    if offload_dir:
        args["offload_dir"] = str(offload_dir)
    if max_batch:
        args["max_batch"] = max_batch
    existing = DEPLOYMENT_NAME_TO_MODEL_DEPLOYMENT.get(model)
    if existing is not None:
        if existing.client_spec.args != args:
            raise PluginError(f"{model} is already registered for {existing.client_spec.args}")
        return model
    spec = _model_spec(folder)
    bos, eos = _special_tokens(folder)
    # The tokenizer's name keys HELM's on-disk tokenization cache: tie it to the tokenizer files, so a name
    # reused for another checkpoint never reads stale tokens.
    tokenizer = f"{ORGANIZATION}/{name}-{_tokenizer_digest(folder)}"
    register_tokenizer_config(TokenizerConfig(
        name=tokenizer,
        tokenizer_spec=TokenizerSpec(class_name="helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                                     args={"pretrained_model_name_or_path": str(folder)}),
        end_of_text_token=eos,
        # language modelling prepends this to a document so that its first token is predicted too
        prefix_token=bos or eos))
    register_model_metadata(ModelMetadata(
        name=model, creator_organization_name=ORGANIZATION, display_name=name,
        description=f"{spec.family.upper()} checkpoint {folder}, run on flexhelm's offloading runtime",
        access="open", release_date=date.fromtimestamp((folder / "config.json").stat().st_mtime),
        tags=[TEXT_MODEL_TAG, FULL_FUNCTIONALITY_TEXT_MODEL_TAG], num_parameters=spec.num_parameters()))
    register_model_deployment(ModelDeployment(
        name=model, model_name=model, tokenizer_name=tokenizer, client_spec=ClientSpec(CLIENT_CLASS, args),
        max_sequence_length=spec.max_positions,
        # one more than the window, as HELM does for GPT-2-style models: language modelling puts the prefix
        # token first, and the engine never feeds the last token (it is only a target)
        max_request_length=spec.max_positions + 1))
    return model


def _model_spec(folder: Path):
    from harness.planning.auto_policy import model_spec

    return model_spec(folder)


def _special_tokens(folder: Path) -> tuple[str | None, str | None]:
    """(bos, eos) token texts, from tokenizer_config.json / special_tokens_map.json, else the loaded tokenizer."""
    found: dict[str, str] = {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        if path.is_file():
            data = json.loads(path.read_text())
            for key in ("bos_token", "eos_token"):
                value = data.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and key not in found:
                    found[key] = value
    if len(found) < 2:
        from runtime.checkpoint import load_tokenizer

        tok = load_tokenizer(folder)
        found.setdefault("bos_token", tok.bos_token)
        found.setdefault("eos_token", tok.eos_token)
    return found.get("bos_token"), found.get("eos_token")


def _tokenizer_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in _TOKENIZER_FILES:
        if (folder / file).is_file():
            h.update(file.encode() + b"\0" + (folder / file).read_bytes())
    return h.hexdigest()[:10]


def _positive_int(variable: str) -> int | None:
    value = os.environ.get(variable)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise PluginError(f"{variable} must be a positive integer, got {value!r}")
    return int(value)


register()
