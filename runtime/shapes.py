"""Model-shape arithmetic, in one place: parameter counts, matmul shapes and FLOPs, cache widths and the working
set of a layer, all read off the family's weight layout (`runtime.families.layout`), never written out again
per family. The cost model, the roofline of the benchmarks, `ModelSpec.num_parameters` and the weight placement
count what the runtime places and multiplies. Torch-free.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from runtime.spec import LayerShape, ModelSpec, WeightSpec


def layout(spec: ModelSpec) -> list[LayerShape]:
    """The family's layers and their weights (`runtime.families.layout`)."""
    from runtime.families import layout as family_layout

    return family_layout(spec)


def unique_weights(layers: list[LayerShape]) -> list[list[WeightSpec]]:
    """Per layer, the weights stored with it: a weight whose sources an earlier layer already holds (a tied head)
    is stored once, with its first layer."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for layer in layers:
        mine = [w for w in layer.weights if w.sources not in seen]
        seen.update(w.sources for w in mine)
        out.append(mine)
    return out


def num_parameters(spec: ModelSpec) -> int:
    """Parameters of the model, a tied head counted once."""
    return sum(w.numel for layer in unique_weights(layout(spec)) for w in layer)


@dataclass(frozen=True)
class Shapes:
    """What the cost model and the roofline need of a model, summed over its layout."""

    decoder_matmuls: tuple[tuple[int, int], ...]
    """(N, K) of each matrix of one decoder layer, in the order the layer multiplies them."""
    embedding_matmuls: tuple[tuple[int, int], ...]
    """(N, K) of the embedding's matrices (OPT-350m's project_in), run on every token."""
    head_matmuls: tuple[tuple[int, int], ...]
    """(N, K) of the head's matrices (project_out, the vocabulary projection), run on the rows whose logits count."""
    matrices: tuple[tuple[int, int], ...]
    """(N, K) of every weight stored as a matrix, the compressible ones: decoder matrices, projections, an untied
    head (a tied head is the token table, a lookup)."""
    kept_matrices: tuple[tuple[int, int], ...]
    """The matrices never placed on disk (`WeightSpec.in_memory`: an untied head)."""
    lookup_params: int
    """Parameters of the tables the layers index (token and position embeddings)."""
    other_params: int
    """Everything else: biases and norms."""
    decoder_params: int
    """Parameters of one decoder layer (all decoder layers have the same weights)."""

    @property
    def matrix_params(self) -> int:
        return sum(n * k for n, k in self.matrices)

    @property
    def kept_matrix_params(self) -> int:
        return sum(n * k for n, k in self.kept_matrices)

    @property
    def params(self) -> int:
        return self.matrix_params + self.lookup_params + self.other_params

    def token_flops(self) -> int:
        """Matmul FLOPs of one token through one decoder layer."""
        return 2 * sum(n * k for n, k in self.decoder_matmuls)

    def embedding_flops(self) -> int:
        """Matmul FLOPs of one token through the embedding (0 but for OPT-350m's project_in)."""
        return 2 * sum(n * k for n, k in self.embedding_matmuls)

    def head_flops(self) -> int:
        """Matmul FLOPs of the head for one row of logits."""
        return 2 * sum(n * k for n, k in self.head_matmuls)


@functools.lru_cache(maxsize=64)
def shapes(spec: ModelSpec) -> Shapes:
    """The model's `Shapes`, computed once per spec (frozen, hashable): the cost model asks for them in every term
    of every candidate policy the search evaluates."""
    layers = layout(spec)
    stored = [w for layer in unique_weights(layers) for w in layer]

    def matmuls(kind: str) -> tuple[tuple[int, int], ...]:
        layer = next(layer for layer in layers if layer.kind == kind)
        # the head multiplies by the token table when tied: a matmul, though the table is stored as a lookup
        return tuple(tuple(w.shape) for w in layer.weights if len(w.shape) == 2 and (kind == "head" or not w.lookup))

    return Shapes(matmuls("decoder"), matmuls("embedding"), matmuls("head"),
                  tuple(tuple(w.shape) for w in stored if w.is_matrix),
                  tuple(tuple(w.shape) for w in stored if w.is_matrix and w.in_memory),
                  sum(w.numel for w in stored if w.lookup),
                  sum(w.numel for w in stored if not w.is_matrix and not w.lookup),
                  sum(w.numel for w in next(layer for layer in layers if layer.kind == "decoder").weights))


def attention_flops(spec: ModelSpec, batch: int, q_len: int, kv_len: int) -> int:
    """FLOPs of one layer's attention: two matmuls of 2 * head_dim FLOPs per (query, key) pair and query head,
    counting only the pairs a causal mask keeps (query j of the q_len new ones sees the kv_len - q_len older keys
    and j + 1 new ones) and, with a sliding window, only the keys inside it."""
    old, window = kv_len - q_len, spec.sliding_window or kv_len
    unclipped = min(max(window - old, 0), q_len)  # queries whose keys all lie inside the window
    pairs = unclipped * old + unclipped * (unclipped + 1) // 2 + (q_len - unclipped) * window
    return 2 * 2 * batch * spec.num_heads * pairs * spec.head_dim


def working_width(spec: ModelSpec) -> int:
    """Values per token a decoder layer holds at once: the residual stream, and the output of each matrix but the
    last (which adds into the residual); OPT: h + 3h (q, k, v) + h (attention) + ffn."""
    return spec.hidden_size + sum(n for n, _ in shapes(spec).decoder_matmuls[:-1])


def kv_values_per_token(spec: ModelSpec) -> int:
    """Key and value values one token adds to one layer's cache (KV heads only: GQA shares them)."""
    return 2 * spec.kv_size


SHARED_PREFIX_MIN = 16
"""Fewest tokens a block's prompts must share before their keys and values are computed once for all rows (fewer
saves less than the extra step costs)."""


def prefix_computed_once(common: int, width: int, new_tokens: int, window: int | None, scoring: bool) -> int:
    """Of the `common` tokens every prompt of a block begins with (`runtime.batching.shared_prefix`), those the
    engine computes once per micro-batch instead of once per row: none under `SHARED_PREFIX_MIN`; none where a
    sliding window is shorter than the block (`width` prompt columns and `new_tokens`: the pads after the prefix would
    move its column distances); when scoring, none under half the block's width (the rows' masked attention then
    costs more than the prefix saves). The engine and the cost model both ask here."""
    if common < SHARED_PREFIX_MIN or (window is not None and width + new_tokens > window):
        return 0
    return 0 if scoring and 2 * common < width else common
