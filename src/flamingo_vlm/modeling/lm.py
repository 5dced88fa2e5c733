"""Turn any Hugging Face causal LM into a Flamingo LM, in place and structurally.

- The ModuleList of decoder layers is found by its shape (no per-architecture name table); a dotted
  path can be given instead.
- Each decoder layer is wrapped by :class:`FlamingoDecoderLayer`, which runs its gated cross-attention
  block (if any) first. The media context arrives as the ``flamingo_context`` keyword argument of the
  LM's forward, which transformers passes on to every decoder layer; for the few families whose forward
  drops extra keyword arguments (MPT, Falcon in transformers 5) a relay carries it there instead
  (:func:`route_context`).
- New special tokens get small trainable embedding rows (:class:`ExtendedEmbedding`,
  :class:`ExtendedLMHead`); the LM's own vocabulary stays frozen.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .context import NO_MEDIA, MediaContext, StepMedia
from .xattn import GatedCrossAttentionBlock

CONTEXT_KWARG = "flamingo_context"
STEP_MEDIA_KWARG = "flamingo_media"


def _text_config(lm: nn.Module):
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(lm: nn.Module, attr: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the LM's decoder layers.

    Found structurally: the ModuleList whose length is the config's number of layers and whose
    elements are all of one class. ``attr`` (e.g. ``"model.layers"``) overrides the search.
    """
    if attr is not None:
        module = lm
        for part in attr.split("."):
            if not hasattr(module, part):
                raise ValueError(f"decoder_layers_attr={attr!r}: {type(module).__name__} has no attribute {part!r}")
            module = getattr(module, part)
        if not isinstance(module, nn.ModuleList):
            raise ValueError(f"decoder_layers_attr={attr!r} names a {type(module).__name__}, not an nn.ModuleList")
        return attr, module

    num_layers = getattr(_text_config(lm), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in lm.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
        and (num_layers is None or len(module) == num_layers)
    ]
    # A wrapped LM's layers are FlamingoDecoderLayer already: find them too, so errors are clear.
    if len(candidates) != 1:
        found = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in candidates) or "none"
        raise ValueError(
            f"cannot find the decoder layers of {type(lm).__name__} (config num_hidden_layers={num_layers}); "
            f"candidate ModuleLists: {found}. Pass decoder_layers_attr='<dotted.path>' "
            "(e.g. 'model.layers' or 'transformer.h') to name them."
        )
    return candidates[0]


def padded_position_ids(attention_mask: torch.Tensor, num_last: int | None = None) -> torch.Tensor | None:
    """attention_mask [B, L] -> position ids [B, L] (or of its last ``num_last`` tokens) counting real tokens
    only; None when no padding precedes a real token, where the LM's own default positions are these.

    A left-padded row gets the positions it would have unpadded, as transformers' ``generate`` gives them
    (this matters for absolute and rotary position embeddings alike). Padding gets position 1, as in
    ``generate``: its value never reaches a real token, which cannot attend to padding. Returning None
    otherwise keeps a right-padded batch's padding positions (and so its every logit) those of the bare LM.
    """
    if not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        return None
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    return positions if num_last is None else positions[:, -num_last:]


class FlamingoDecoderLayer(nn.Module):
    """A frozen LM decoder layer with an optional gated cross-attention block run before it.

    The media context arrives per call (``flamingo_context``); a call without one sees no media, so
    the block's feed-forward still runs and its cross-attention adds 0, as for any text-only batch.
    """

    def __init__(self, decoder_layer: nn.Module, gated_xattn: GatedCrossAttentionBlock | None, block_index: int | None):
        super().__init__()
        self.gated_xattn = gated_xattn
        self.decoder_layer = decoder_layer
        self.block_index = block_index

    def forward(self, hidden_states: torch.Tensor, *args: Any, flamingo_context: MediaContext | None = None, **kwargs: Any):
        if self.gated_xattn is not None:
            context = NO_MEDIA if flamingo_context is None else flamingo_context
            if not isinstance(context, MediaContext):
                raise TypeError(
                    f"flamingo_context must be a MediaContext (built by FlamingoModel.media_context), got {type(context).__name__}"
                )
            if context.has_media:
                hidden_states = self.gated_xattn(hidden_states, context.kv(self.block_index, self.gated_xattn), context.routing)
            else:
                hidden_states = self.gated_xattn(hidden_states)
        return self.decoder_layer(hidden_states, *args, **kwargs)


class ExtendedEmbedding(nn.Module):
    """Frozen base embedding + ``num_new`` trainable rows for ids ``first_new_id .. first_new_id + num_new - 1``.

    input_ids [...] -> [..., d]. Every other id gives exactly the base embedding, also ids above the new
    tokens: a padded vocabulary (Pythia, OPT, Qwen2, MPT) has embedding rows past its tokenizer's entries,
    which the LM runs like any other row.
    """

    def __init__(self, base: nn.Embedding, num_new: int, first_new_id: int) -> None:
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new = nn.Embedding(num_new, base.weight.shape[1], dtype=torch.float32, device=base.weight.device)
        with torch.no_grad():  # start the new rows at the mean of the base vocabulary, a common safe init
            self.new.weight.copy_(base.weight.float().mean(0, keepdim=True).expand(num_new, -1))

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for dtype/device/size
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return max(self.base.num_embeddings, self.first_new_id + self.new.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids >= self.first_new_id) & (input_ids < self.first_new_id + self.new.num_embeddings)
        base = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        if not bool(is_new.any()):
            return base
        new = self.new((input_ids - self.first_new_id).clamp(0, self.new.num_embeddings - 1)).to(base.dtype)
        scale = getattr(self.base, "embed_scale", None)
        if isinstance(scale, torch.Tensor):  # an embedding that scales its rows (Gemma 3): the new rows alike
            new = new * scale.to(new.dtype)
        return torch.where(is_new[..., None], new, base)


class ExtendedLMHead(nn.Module):
    """Frozen base LM head + trainable output rows for the new tokens.

    hidden [..., d] -> logits [..., max(V_base, first_new_id + num_new)]; the new tokens' columns are at
    their ids. ``tied_to`` shares the new rows with the input embedding when the LM ties its embeddings.
    ``truncate``: exactly ``first_new_id + num_new`` columns, dropping LM-head rows past the new tokens.
    """

    def __init__(self, base: nn.Module, num_new: int, first_new_id: int, tied_to: nn.Embedding | None = None, truncate: bool = False) -> None:
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.num_new = num_new
        self.truncate = truncate
        if tied_to is None:
            d = base.weight.shape[1]
            self.new_weight = nn.Parameter(torch.zeros(num_new, d, device=base.weight.device))
            with torch.no_grad():
                self.new_weight.copy_(base.weight.float().mean(0, keepdim=True).expand(num_new, -1))
            self.tied_to = None
        else:
            self.new_weight = None
            self.tied_to = [tied_to]  # a list keeps it out of this module's parameters (it is owned elsewhere)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def new_rows(self) -> torch.Tensor:
        return self.new_weight if self.tied_to is None else self.tied_to[0].weight

    @property
    def vocab_size(self) -> int:
        """The logits' width (see the class docstring)."""
        end = self.first_new_id + self.num_new
        return end if self.truncate else max(self.base.weight.shape[0], end)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base = self.base(hidden)
        new = (hidden.to(self.new_rows().dtype) @ self.new_rows().T).to(base.dtype)
        v_base = base.shape[-1]
        end = self.first_new_id + self.num_new
        if self.first_new_id == v_base:
            return torch.cat([base, new], dim=-1)
        if self.truncate:
            return torch.cat([base[..., : self.first_new_id], new], dim=-1)
        if end > v_base:  # new ids partly beyond the base head: pad, then place the new columns
            base = torch.cat([base, base.new_full((*base.shape[:-1], end - v_base), float("-inf"))], dim=-1)
        base = base.clone()
        base[..., self.first_new_id : end] = new
        return base


def wrap_lm(
    lm: nn.Module,
    blocks: dict[int, GatedCrossAttentionBlock],
    decoder_layers_attr: str | None = None,
) -> str:
    """Wrap each decoder layer of ``lm`` in place; ``blocks`` maps layer index -> its gated xattn block.

    Returns the dotted path of the decoder layers.
    """
    path, layers = find_decoder_layers(lm, decoder_layers_attr)
    if any(isinstance(layer, FlamingoDecoderLayer) for layer in layers):
        raise ValueError("this LM is already a Flamingo LM (its decoder layers are wrapped)")
    order = {layer_idx: k for k, layer_idx in enumerate(sorted(blocks))}
    for i in range(len(layers)):
        layers[i] = FlamingoDecoderLayer(layers[i], blocks.get(i), order.get(i))
    _install_generation_hook(lm)
    return path


class _ProbeReachedLayer(Exception):
    def __init__(self, received: bool) -> None:
        self.received = received


# The media contexts of the relayed LM calls in progress, innermost last (see _install_context_relay).
_RELAYED_CONTEXTS: ContextVar[tuple[MediaContext | None, ...]] = ContextVar("flamingo_relayed_contexts", default=())


def _probe_context_route(lm: nn.Module, layers: nn.ModuleList) -> bool | None:
    """Whether ``lm``'s forward hands ``flamingo_context`` to its first decoder layer (None: cannot run yet).

    Runs the LM on one token and stops at the first decoder layer, so it costs an embedding lookup. A forward
    that does not take the keyword at all (custom code with a fixed signature) raises its TypeError."""
    param = next(lm.parameters(), None)
    if param is None or param.device.type == "meta":
        return None  # nothing to run yet (weights materialised later)

    def stop(module, args, kwargs):
        raise _ProbeReachedLayer(kwargs.get(CONTEXT_KWARG) is NO_MEDIA)

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            lm(input_ids=torch.zeros(1, 1, dtype=torch.long, device=param.device), **{CONTEXT_KWARG: NO_MEDIA})
    except _ProbeReachedLayer as reached:
        return reached.received
    finally:
        handle.remove()
    raise ValueError(
        f"{type(lm).__name__}'s forward never called its decoder layers ({type(layers[0]).__name__}) as modules: pass "
        "decoder_layers_attr if these are not its decoder layers; an LM that calls their forward methods directly is not supported"
    )


def _install_context_relay(lm: nn.Module, layers: nn.ModuleList) -> None:
    """Carry ``flamingo_context`` from the LM's forward to its decoder layers when the forward drops it.

    transformers 5's MPT and Falcon take ``**kwargs`` in their causal LM's forward but call their blocks
    with fixed arguments; custom code may not take the keyword at all. Hooks on the LM (and its base model,
    which the fused loss calls) take the context off the call's keyword arguments and hold it for the
    duration of the call (a context variable, so threads and nested calls keep theirs; popped when the call
    returns or raises); a pre-hook on each wrapped layer puts it back into the layer's keyword arguments.
    That hook runs before the layer's forward, so activation checkpointing (which wraps that forward)
    records the context with the other arguments and recomputes the layer with it. It is still the one
    context of ``FlamingoModel.media_context``, passed per call; only its transport differs.
    """

    def push(module, args, kwargs):
        stack = _RELAYED_CONTEXTS.get()
        # a call without the keyword (the base model inside a relayed LM call) inherits the outer context
        context = kwargs.get(CONTEXT_KWARG, stack[-1] if stack else None)
        _RELAYED_CONTEXTS.set(stack + (context,))
        if CONTEXT_KWARG in kwargs:
            return args, {k: v for k, v in kwargs.items() if k != CONTEXT_KWARG}
        return None

    def pop(module, args, kwargs, output):
        _RELAYED_CONTEXTS.set(_RELAYED_CONTEXTS.get()[:-1])

    for module in dict.fromkeys([lm, getattr(lm, "base_model", lm)]):
        module.register_forward_pre_hook(push, with_kwargs=True)
        module.register_forward_hook(pop, with_kwargs=True, always_call=True)

    def put_back(module, args, kwargs):
        stack = _RELAYED_CONTEXTS.get()
        if stack and stack[-1] is not None and CONTEXT_KWARG not in kwargs:
            return args, {**kwargs, CONTEXT_KWARG: stack[-1]}
        return None

    for layer in layers:
        layer.register_forward_pre_hook(put_back, with_kwargs=True)


def route_context(lm: nn.Module, layers: nn.ModuleList) -> None:
    """Make sure the media context reaches every wrapped decoder layer; a clear error where it cannot.

    Most families pass the causal LM's extra keyword arguments down to every decoder layer. For one whose
    forward drops them (transformers 5's MPT and Falcon) or does not take them (custom code with a fixed
    signature) a relay is installed (:func:`_install_context_relay`) and the route probed again, so that no
    family runs with cross-attention blocks that never see the images. An LM on the meta device cannot run the
    probe: it gets the relay, which carries the context for every family.
    """
    try:
        reached = _probe_context_route(lm, layers)
    except TypeError:
        reached = False  # the forward does not take the keyword: the relay takes it off before the forward runs
    if reached:
        return
    _install_context_relay(lm, layers)
    if reached is None:
        return  # an LM on the meta device (materialised later) cannot be probed: the relay works for every family
    name = type(lm).__name__
    try:
        reached = _probe_context_route(lm, layers)
    except TypeError as e:
        raise ValueError(f"{name}'s forward fails with the media context relayed to its decoder layers ({e}); this LM is not supported") from e
    if not reached:
        raise ValueError(
            f"{name}'s forward does not pass keyword arguments on to its decoder layers, and relaying them failed: the media "
            "context would never reach the cross-attention blocks (images would change nothing); this LM is not supported"
        )


def add_new_token_rows(lm: nn.Module, num_new: int, first_new_id: int, truncate: bool = False) -> None:
    """Give the LM trainable embedding (and output) rows for ``num_new`` new tokens from ``first_new_id``.

    ``truncate``: the logits end at the last new token (see :class:`ExtendedLMHead`).
    """
    base_in = lm.get_input_embeddings()
    if first_new_id > base_in.weight.shape[0]:
        raise ValueError(
            f"the tokenizer's new tokens start at id {first_new_id} but the LM has only {base_in.weight.shape[0]} "
            "embedding rows: is this tokenizer the LM's own?"
        )
    embed = ExtendedEmbedding(base_in, num_new, first_new_id)
    lm.set_input_embeddings(embed)
    base_out = lm.get_output_embeddings()
    if base_out is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (LM head): is it a causal LM?")
    tied = bool(getattr(_text_config(lm), "tie_word_embeddings", False)) and base_out.weight is base_in.weight
    head = ExtendedLMHead(base_out, num_new, first_new_id, tied_to=embed.new if tied else None, truncate=truncate)
    lm.set_output_embeddings(head)
    # As resize_token_embeddings does: the config's vocabulary is the logits' width now (transformers'
    # beam search before 5.2x reshapes scores by config.vocab_size, not by the logits it gets).
    _text_config(lm).vocab_size = head.vocab_size


def _install_generation_hook(lm: nn.Module) -> None:
    """Let ``lm.generate(..., flamingo_media=StepMedia)`` route media at every step.

    transformers validates generate's extra kwargs against ``prepare_inputs_for_generation``'s signature
    and forwards the rest to the model: this instance-level override names the kwarg, and turns the
    per-generation media into the per-step context (phi over the whole sequence so far, sliced to the
    tokens being run: stateless, so beams, sampling and cache reordering need no bookkeeping).
    """
    original = lm.prepare_inputs_for_generation

    def prepare_inputs_for_generation(input_ids, flamingo_media: StepMedia | None = None, **kwargs):
        inputs = original(input_ids, **kwargs)
        if flamingo_media is not None:
            key = "input_ids" if inputs.get("input_ids") is not None else "inputs_embeds"
            inputs[CONTEXT_KWARG] = flamingo_media.context(input_ids, inputs[key].shape[1])
        return inputs

    prepare_inputs_for_generation.__signature__ = inspect.signature(prepare_inputs_for_generation)
    lm.prepare_inputs_for_generation = prepare_inputs_for_generation
