"""Stand-ins for the HELM pieces a model would provide: a one-character-per-token window service, adapters
built around it, and hand-built request results. No tokenizer, client or model is involved."""

from __future__ import annotations

from dataclasses import dataclass

from helm.benchmark.adaptation.adapter_spec import AdapterSpec
from helm.benchmark.adaptation.request_state import RequestState
from helm.benchmark.scenarios.scenario import Instance
from helm.benchmark.window_services.window_service import EncodeResult
from helm.common.request import GeneratedOutput, Request, RequestResult, Token
from helm.common.tokenization_request import TokenizationToken


@dataclass
class CharWindowService:
    """Every character is a token; `prefix_token` is one character too."""

    max_sequence_length: int = 2048
    max_request_length: int = 2048
    prefix_token: str = "^"
    max_sequence_and_generated_tokens_length: int = 10**9

    def encode(self, text: str, truncation: bool = False, max_length: int | None = None) -> EncodeResult:
        return EncodeResult(text=text, tokens=[TokenizationToken(c) for c in text])

    def decode(self, tokens: list[TokenizationToken], normalized_text: str | None = None) -> str:
        return "".join(str(t.value) for t in tokens)

    def fits_within_context_window(self, text: str, expected_completion_token_length: int = 0) -> bool:
        return len(text) + expected_completion_token_length <= self.max_request_length

    def truncate_from_right(self, text: str, expected_completion_token_length: int = 0) -> str:
        return text[: self.max_request_length - expected_completion_token_length]


def make_adapter(adapter_class: type, adapter_spec: AdapterSpec, window_service: CharWindowService):
    """An adapter of `adapter_class` using `window_service` (HELM's constructor would look one up by model)."""
    adapter = adapter_class.__new__(adapter_class)
    adapter.adapter_spec = adapter_spec
    adapter.window_service = window_service
    return adapter


def answered(
    instance: Instance,
    tokens: list[tuple[str, float]],
    reference_index: int | None = None,
    num_conditioning_tokens: int = 0,
    prompt: str | None = None,
) -> RequestState:
    """A request state for `instance` whose one completion is `tokens` as (text, logprob); the prompt
    defaults to the tokens' text (an echo request)."""
    text = "".join(t for t, _ in tokens)
    return RequestState(
        instance=instance,
        reference_index=reference_index,
        request_mode="original" if reference_index is not None else None,
        train_trial_index=0,
        output_mapping=None,
        request=Request(model="test/model", model_deployment="test/model", prompt=text if prompt is None else prompt),
        result=RequestResult(
            success=True,
            embedding=[],
            completions=[
                GeneratedOutput(
                    text=text, logprob=sum(lp for _, lp in tokens), tokens=[Token(t, lp) for t, lp in tokens]
                )
            ],
            cached=False,
        ),
        num_train_instances=0,
        prompt_truncated=False,
        num_conditioning_tokens=num_conditioning_tokens,
    )
