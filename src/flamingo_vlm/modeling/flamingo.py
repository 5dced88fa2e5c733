"""FlamingoModel: frozen vision encoder -> Perceiver Resampler -> frozen LM with gated cross-attention."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.masking_utils import find_packed_sequence_indices

from ..config import FlamingoConfig
from .backbones import check_lm_signature, lm_signature, load_backbones, paths_after_loading, paths_for_saving, write_lm_signature
from .card import push_to_hub, write_model_card
from .context import NO_MEDIA, MediaContext, MediaKV, StepMedia
from .finetune import apply_backbone_training, backbone_state, lora_dropouts
from .lm import (
    CONTEXT_KWARG,
    STEP_MEDIA_KWARG,
    ExtendedEmbedding,
    ExtendedLMHead,
    FlamingoDecoderLayer,
    add_new_token_rows,
    find_decoder_layers,
    padded_position_ids,
    route_context,
    wrap_lm,
)
from .loss import PLAIN_HEAD_MODEL_TYPES, causal_lm_loss, causal_lm_loss_weighted, head_cross_entropy, head_cross_entropy_weighted
from .masking import build_routing
from .resampler import FeatureTokens, PerceiverResampler
from .vision import VisionEncoder
from .xattn import GatedCrossAttentionBlock

WEIGHTS_NAME = "model.safetensors"


@dataclass
class FlamingoOutput:
    """loss: scalar token NLL over labels != -100, mean or sum (None without labels); logits [B, L, V]
    (None when the loss was fused with the LM head); cache: the LM's KV cache when use_cache;
    visual_tokens [M, n, d_visual]; token_nll [B, L]: with ``loss_weights``, each label's NLL (detached, 0 where
    ignored)."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None when the loss was fused with the LM head (``return_logits=False``)
    cache: Any = None
    visual_tokens: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def xattn_layer_indices(num_layers: int, every_n: int, position: str = "last") -> list[int]:
    """Decoder layers that get a gated xattn block before them: the last layer of each group of n (layers
    n-1, 2n-1, ...: OpenFlamingo), or with ``position="first"`` the first (layers 0, n, 2n, ...: IDEFICS)."""
    if position == "first":
        return [i for i in range(num_layers) if i % every_n == 0]
    if position != "last":
        raise ValueError(f"cross_attn_position must be 'last' or 'first', got {position!r}")
    return [i for i in range(num_layers) if (i + 1) % every_n == 0]


class FlamingoModel(nn.Module):
    """A Flamingo model around a frozen HF causal LM and a frozen vision encoder.

    Trainable: the resampler, the gated xattn blocks and the new special-token rows
    (:meth:`trainable_parameters`). Everything else is frozen and kept in eval mode (no dropout).
    """

    def __init__(self, config: FlamingoConfig, lm: nn.Module, vision_encoder: VisionEncoder) -> None:
        super().__init__()
        if config.media_token_id is None or config.pad_token_id is None or config.end_of_chunk_token_id is None:
            raise ValueError("config lacks the special token ids: build the model with flamingo_vlm.build_flamingo")
        self.config = config
        self.vision_encoder = vision_encoder.requires_grad_(False)
        self.lm = lm.requires_grad_(False)
        if config.use_resampler:
            self.resampler: PerceiverResampler | FeatureTokens = PerceiverResampler(
                dim=vision_encoder.hidden_size,
                depth=config.resampler_depth,
                num_latents=config.resampler_num_latents,
                heads=config.resampler_heads,
                dim_head=config.resampler_dim_head,
                ff_mult=config.resampler_ff_mult,
                max_num_frames=config.max_num_frames,
                activation=config.resampler_ff_activation or config.ff_activation,
                spatial_positions=config.resampler_spatial_positions,
                qk_norm=config.resampler_qk_norm,
            )
        else:
            self.resampler = FeatureTokens()
        _, layers = find_decoder_layers(lm, config.decoder_layers_attr)
        if any(isinstance(layer, FlamingoDecoderLayer) for layer in layers):  # check before changing anything
            raise ValueError("this LM is already a Flamingo LM (its decoder layers are wrapped): pass a fresh LM")
        if config.cross_attn_every_n_layers > len(layers):
            raise ValueError(
                f"cross_attn_every_n_layers={config.cross_attn_every_n_layers} is more than the LM's {len(layers)} decoder "
                "layers: no cross-attention block would be built and every image would be ignored"
            )
        blocks = {
            i: GatedCrossAttentionBlock(
                dim=self.lm_hidden_size,
                dim_visual=vision_encoder.hidden_size,
                heads=config.xattn_heads,
                dim_head=config.xattn_dim_head,
                ff_mult=config.xattn_ff_mult,
                activation=config.ff_activation,
                norm_media=config.xattn_norm_media,
                gate_init=config.gate_init,
                gate_init_std=config.gate_init_std,
                norm=config.xattn_norm,
                norm_eps=config.xattn_norm_eps,
                qk_norm=config.xattn_qk_norm,
                ff_type=config.xattn_ff_type,
                ff_dim=config.xattn_ff_dim,
                gate=config.xattn_gate,
            )
            for i in xattn_layer_indices(len(layers), config.cross_attn_every_n_layers, config.cross_attn_position)
        }
        if config.new_token_ids:
            add_new_token_rows(lm, len(config.new_token_ids), config.new_token_ids[0], truncate=config.truncate_vocab)
        self.decoder_layers_attr = wrap_lm(lm, blocks, config.decoder_layers_attr)
        route_context(lm, find_decoder_layers(lm, self.decoder_layers_attr)[1])
        self._base_lm_signature: dict[str, Any] | None = None
        self._remember_lm_signature()
        apply_backbone_training(self)  # fine-tuning: LoRA adapters, trained backbone weights, input size
        device = next(lm.parameters()).device
        if device.type != "meta":  # a meta LM is materialised later (sharded construction); the bridge keeps its values
            self.resampler.to(device)
            for block in blocks.values():
                block.to(device)
        self.train(False)

    # ---- structure ---------------------------------------------------------------------------
    def _bridge_anchor(self) -> torch.Tensor:
        """A trained tensor that is always there: the resampler's latents, or (without a resampler) the first
        xattn block's gate. Read each time, as FSDP replaces parameters."""
        latents = getattr(self.resampler, "latents", None)
        return latents if latents is not None else self.xattn_blocks[0].attn_gate

    @property
    def device(self) -> torch.device:
        return self._bridge_anchor().device

    @property
    def bridge_dtype(self) -> torch.dtype:
        """The dtype of the trained bridge: visual tokens are cast to it."""
        return self._bridge_anchor().dtype

    @property
    def lm_hidden_size(self) -> int:
        return self.lm.config.get_text_config().hidden_size

    def lm_signature(self) -> dict[str, Any]:
        """What identifies the LM (see :func:`~flamingo_vlm.modeling.backbones.lm_signature`), saved beside the
        bridge so that loading it onto another LM is refused."""
        saved = getattr(self, "_base_lm_signature", None)
        if saved is not None:
            return saved
        _, layers = find_decoder_layers(self.lm, self.decoder_layers_attr)
        with torch.no_grad():
            return lm_signature(self.lm, [layer.decoder_layer for layer in layers])

    def set_backbone_training(self, **changes: Any) -> FlamingoModel:
        """Train more of the backbones from now on (fine-tuning an already trained bridge): ``changes`` are
        FlamingoConfig's train_vision_blocks, train_lm_layers, lora_* and vision_image_size fields (see
        :mod:`flamingo_vlm.modeling.finetune`). The model's config becomes the one that describes it, so
        ``save_pretrained`` / ``from_pretrained`` restore exactly what is trained. Returns self."""
        allowed = {"train_vision_blocks", "train_lm_layers", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "vision_image_size"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"set_backbone_training: {unknown} are not backbone-training settings ({sorted(allowed)})")
        current = self.config
        lora_keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
        if current.lora_rank and any(k in changes and changes[k] != getattr(current, k) for k in lora_keys):
            raise ValueError("this model already has LoRA adapters; their settings cannot change (merge them or start from the bridge)")
        vision, layers = changes.get("train_vision_blocks", current.train_vision_blocks), changes.get("train_lm_layers", current.train_lm_layers)
        if (current.train_vision_blocks and vision != -1 and (current.train_vision_blocks == -1 or vision < current.train_vision_blocks)) or (
            layers < current.train_lm_layers
        ):
            raise ValueError(
                f"this model holds fine-tuned backbone weights (train_vision_blocks={current.train_vision_blocks}, train_lm_layers="
                f"{current.train_lm_layers}): they must stay in what is trained and saved (asked: {vision}, {layers})"
            )
        self.config = dataclasses.replace(current, **changes)
        try:
            self._remember_lm_signature()
            apply_backbone_training(self)
        except Exception:
            self.config = current  # refused settings leave the model's description as it was
            raise
        return self

    def _remember_lm_signature(self) -> None:
        """When fine-tuning trains the LM's first decoder layer (the one :meth:`lm_signature` samples), keep the
        signature of the LM as loaded, so the saved model still names its base LM."""
        _, layers = find_decoder_layers(self.lm, self.decoder_layers_attr)
        if self._base_lm_signature is None and self.config.train_lm_layers >= len(layers):
            if next(self.lm.parameters()).device.type != "meta":
                self._base_lm_signature = self.lm_signature()

    @property
    def xattn_blocks(self) -> list[GatedCrossAttentionBlock]:
        _, layers = find_decoder_layers(self.lm, self.decoder_layers_attr)
        return [layer.gated_xattn for layer in layers if isinstance(layer, FlamingoDecoderLayer) and layer.gated_xattn is not None]

    def train(self, mode: bool = True) -> FlamingoModel:
        """Only the bridge (and LoRA adapters' dropout) follows ``mode``; the backbones always run in eval mode,
        their fine-tuned parts too (no dropout of their own, as they ran when pretrained features were taken)."""
        super().train(mode)
        self.vision_encoder.eval()
        self.lm.eval()
        for block in self.xattn_blocks:
            block.train(mode)
        for module in lora_dropouts(self):
            module.train(mode)
        return self

    def flamingo_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under layout-independent names: resampler.*, xattn.{k}.*, new_token_*."""
        state = {f"resampler.{k}": v for k, v in self.resampler.state_dict(keep_vars=True).items()}
        for k, block in enumerate(self.xattn_blocks):
            state.update({f"xattn.{k}.{name}": v for name, v in block.state_dict(keep_vars=True).items()})
        embed, head = self.lm.get_input_embeddings(), self.lm.get_output_embeddings()
        if isinstance(embed, ExtendedEmbedding):
            state["new_token_embeddings.weight"] = embed.new.weight
        if isinstance(head, ExtendedLMHead) and head.new_weight is not None:
            state["new_token_lm_head.weight"] = head.new_weight
        if self.config.save_lm_embeddings:  # frozen, but not the LM checkpoint's (see FlamingoConfig)
            state.update(self._lm_embedding_state())
        state.update(backbone_state(self))  # fine-tuned backbone weights / LoRA adapters, if any
        return state

    def _lm_embedding_state(self) -> dict[str, torch.Tensor]:
        """The LM's own input-embedding matrix [V, d] (and LM-head matrix when untied), under lm_* names."""
        embed, head = self.lm.get_input_embeddings(), self.lm.get_output_embeddings()
        embed_w = embed.base.weight if isinstance(embed, ExtendedEmbedding) else embed.weight
        head_w = head.base.weight if isinstance(head, ExtendedLMHead) else head.weight
        state = {"lm_input_embeddings.weight": embed_w}
        if head_w is not embed_w:
            state["lm_output_embeddings.weight"] = head_w
        return state

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) for every trained weight, under :meth:`flamingo_state_dict` names."""
        params = {id(p): p for p in self.parameters()}
        frozen = {id(t) for t in self._lm_embedding_state().values()}
        for name, tensor in self.flamingo_state_dict().items():
            if id(tensor) in params and id(tensor) not in frozen:  # parameters only (LayerNorm buffers would appear here too)
                yield name, params[id(tensor)]

    def _set_trainable(self) -> None:
        for _, p in self.trainable_parameters():
            p.requires_grad_(True)

    def load_flamingo_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`flamingo_state_dict` weights; every key and shape must match."""
        own = self.flamingo_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                "the checkpoint does not fit this model (different backbones or config?)\n"
                f"  missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
                f"  unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}\n"
                f"  shape mismatches: {mismatched[:10]}"
            )
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])

    # ---- media -------------------------------------------------------------------------------
    def encode_vision(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [M, T, C, H, W] -> frame features [M, T, S, d]; the encoder runs once per real frame."""
        m, t = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1)
        keep = None if frame_mask is None else frame_mask.reshape(-1).bool()
        if keep is not None:
            frames = frames[keep]  # padding frames never reach the encoder
        encoder_dtype = next(self.vision_encoder.parameters()).dtype
        trains_encoder = any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(trains_encoder and torch.is_grad_enabled()):  # frozen: keep no activations
            feats = self.vision_encoder(frames.to(encoder_dtype))
        if keep is not None:
            full = feats.new_zeros(m * t, *feats.shape[1:])
            full[keep] = feats
            feats = full
        return feats.view(m, t, *feats.shape[1:])

    def encode_media(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [M, T, C, H, W] -> visual tokens [M, n, d_visual]: n = num_latents, or T * S vision features
        without a resampler (``use_resampler=False``)."""
        features = self.encode_vision(pixel_values, frame_mask)
        return self.resampler(features.to(self.bridge_dtype), frame_mask)

    def _visual_tokens(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        frame_mask: torch.Tensor | None,
        vision_features: torch.Tensor | None,
        visual_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Validate inputs and return (visual tokens [M, n, d] or None, media count per row [B])."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [batch, seq_len], got {shape}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {self.device}: move them with .to(model.device)")
        counts = (input_ids == self.config.media_token_id).sum(dim=1)
        given = [n for n, x in (("pixel_values", pixel_values), ("vision_features", vision_features), ("visual_tokens", visual_tokens)) if x is not None]
        if len(given) > 1:
            raise ValueError(f"pass only one of pixel_values, vision_features, visual_tokens (got {given})")
        total = int(counts.sum())
        if not given:
            if total:
                raise ValueError(f"the batch has {total} {self.config.media_token} token(s) but no media were given (pixel_values=None)")
            return None, counts
        x = pixel_values if pixel_values is not None else vision_features if vision_features is not None else visual_tokens
        if x.device != self.device:
            raise ValueError(f"{given[0]} is on {x.device} but the model is on {self.device}: move it with .to(model.device)")
        if not x.is_floating_point():
            raise ValueError(f"{given[0]} must be a float tensor (normalised pixels or features), got {x.dtype}")
        if pixel_values is not None:
            if x.ndim == 4:  # [M, C, H, W]: images
                x = x[:, None]
            elif x.ndim == 6:  # [B, N, T, C, H, W], OpenFlamingo's layout: N media in every row
                if not bool((counts == x.shape[1]).all()):
                    raise ValueError(
                        f"pixel_values [batch, media, frames, C, H, W] has {x.shape[1]} media per row but the rows hold "
                        f"{counts.tolist()} {self.config.media_token} tokens; pass the batch's media flat as [M, T, C, H, W]"
                    )
                x = x.flatten(0, 1)
                if frame_mask is not None and frame_mask.ndim == 3:
                    frame_mask = frame_mask.flatten(0, 1)
            if x.ndim != 5 or x.shape[2] != 3:
                raise ValueError(
                    f"pixel_values must be [M, C, H, W], [M, T, C, H, W] or [B, N, T, C, H, W] with C=3, got shape {tuple(pixel_values.shape)}"
                )
        elif vision_features is not None and x.ndim != 4:
            raise ValueError(f"vision_features must be [M, T, S, d], got shape {tuple(x.shape)}")
        elif visual_tokens is not None and x.ndim != 3:
            raise ValueError(f"visual_tokens must be [M, n, d], got shape {tuple(x.shape)}")
        if x.shape[0] != total:
            raise ValueError(
                f"the batch has {total} {self.config.media_token} token(s) (per row: {counts.tolist()}) but {x.shape[0]} media were given"
            )
        if frame_mask is not None and frame_mask.shape != x.shape[:2]:
            raise ValueError(f"frame_mask must be [M, T] = {tuple(x.shape[:2])}, got {tuple(frame_mask.shape)}")
        if pixel_values is not None:
            return self.encode_media(x, frame_mask), counts
        if vision_features is not None:
            return self.resampler(x.to(self.bridge_dtype), frame_mask), counts
        return x, counts

    def media_kv(self, visual_tokens: torch.Tensor) -> MediaKV:
        """visual_tokens [M, n, d_visual] -> each xattn block's (keys, values) [M, H, n, D], to compute once and reuse."""
        return tuple(block.media_kv(visual_tokens) for block in self.xattn_blocks)

    def media_context(
        self,
        input_ids: torch.Tensor,
        visual_tokens: torch.Tensor | None = None,
        *,
        media_kv: MediaKV | None = None,
        media_offsets: torch.Tensor | None = None,
        last_positions: int | None = None,
        segments: torch.Tensor | None = None,
    ) -> MediaContext:
        """The media context of one LM call: the one way to build it (forward, generation, scoring, bench).

        input_ids [B, L]: every token of each row so far, the ``<image>`` tokens included (a row continuing
        from a KV cache passes its cached prefix too). visual_tokens [M, n, d]: the batch's media, each row's
        in the order of its ``<image>`` tokens; None when the batch has none (blocks then run their
        feed-forward only). media_kv: :meth:`media_kv` of visual_tokens, when computed once for many calls.
        media_offsets [B]: index in visual_tokens of each row's first medium; by default rows own consecutive
        media in row order. Rows may share media (beams of one prompt, candidates scored after one prompt).
        last_positions: route only the last k tokens of each row (the tokens the LM is about to run).
        segments [B, L]: packed samples (which sample each token belongs to, non-decreasing along a row): a token
        sees no medium of another sample.
        """
        counts = (input_ids == self.config.media_token_id).sum(dim=1)
        if visual_tokens is None:
            if bool(counts.any()):
                raise ValueError(f"the batch has {int(counts.sum())} {self.config.media_token} token(s) but no media were given")
            return NO_MEDIA
        if media_offsets is None:
            media_offsets = counts.cumsum(0) - counts
            needed = int(counts.sum())
        else:
            needed = int((media_offsets + counts).max()) if counts.numel() else 0
        if needed > visual_tokens.shape[0]:
            raise ValueError(f"the rows' {self.config.media_token} tokens need {needed} media but {visual_tokens.shape[0]} were given")
        c = self.config
        routing = build_routing(
            input_ids,
            media_token_id=c.media_token_id,
            media_offsets=media_offsets,
            media_counts=counts,
            mode=c.media_attention,
            eos_token_id=c.eos_token_id if (c.reset_media_at_eos or c.reset_media_after_eos) else None,
            eos_sees_media=c.reset_media_after_eos,
            last_positions=last_positions,
            segments=segments,
        )
        return MediaContext(visual_tokens=visual_tokens, routing=routing, media_kv=media_kv)

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        media_kv: MediaKV | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        past_input_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
        loss_weights: torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> FlamingoOutput:
        """input_ids / attention_mask / labels [B, L]; media as pixel_values [M, T, C, H, W] (or [M, C, H, W],
        or [B, N, T, C, H, W]), or pre-computed vision_features [M, T, S, d] or visual_tokens [M, n, d] (with
        their :meth:`media_kv` when computed once for many calls).

        The M media are the batch's ``<image>`` tokens in row order. Continuing from a KV ``cache``, pass
        the tokens already in it as ``past_input_ids`` [B, P] (and the media of the whole sequence): the
        new tokens then attend to the images of the prefix. Returns a :class:`FlamingoOutput`.

        With ``labels``, ``loss`` is the next-token NLL, ``loss_reduction`` "mean" or "sum" over the predicted
        tokens. ``return_logits=False`` (training) computes it fused with the LM head where the LM allows
        (:func:`~flamingo_vlm.modeling.loss.head_cross_entropy`), never holding the [B, L, V] logits; ``logits``
        is then None.

        Packed samples (training): several samples in a row, ``attention_mask=None`` and ``position_ids`` [B, L]
        restarting at 0 for each sample (padding at a row's end counts on as one more sample). The LM then
        attends within each sample (transformers' packed-sequence masks), and so does the cross-attention. The
        first token of a sample must have label -100 (the causal shift would predict it from the previous one).

        ``loss_weights`` [B, L] (aligned with labels): ``loss`` is then sum_t loss_weights[t] * NLL(labels[t])
        (``loss_reduction`` "sum"), and ``token_nll`` holds each label's NLL.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if loss_weights is not None and (labels is None or loss_weights.shape != labels.shape or loss_reduction != "sum"):
            raise ValueError("loss_weights weigh the labels' NLL in a sum: pass labels of the same shape and loss_reduction='sum'")
        full_ids = input_ids if past_input_ids is None else torch.cat([past_input_ids, input_ids], dim=1)
        visual, _ = self._visual_tokens(full_ids, pixel_values, frame_mask, vision_features, visual_tokens)
        if media_kv is not None and visual_tokens is None:
            raise ValueError("media_kv are the keys/values of visual_tokens: pass both")
        last = None if past_input_ids is None else input_ids.shape[1]
        segments = None
        if attention_mask is None and past_input_ids is None and cache is None and lm_kwargs.get("position_ids") is not None:
            # the LM's rule for packed samples, so that cross-attention splits a row where self-attention does
            segments = find_packed_sequence_indices(lm_kwargs["position_ids"].expand_as(input_ids))
        context = self.media_context(full_ids, visual, media_kv=media_kv, last_positions=last, segments=segments)
        if attention_mask is not None and "position_ids" not in lm_kwargs:
            positions = padded_position_ids(attention_mask, input_ids.shape[1])
            if positions is not None:
                lm_kwargs["position_ids"] = positions
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        lm_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache, **lm_kwargs)
        lm_inputs[CONTEXT_KWARG] = context
        token_nll = None
        if labels is not None and not return_logits and not use_cache and self.fused_loss_supported:
            hidden = self.lm.base_model(**lm_inputs)[0]
            head = self.lm.get_output_embeddings()
            if loss_weights is not None:
                loss, token_nll = head_cross_entropy_weighted(hidden, head, labels, loss_weights)
            else:
                loss = head_cross_entropy(hidden, head, labels, loss_reduction)
            return FlamingoOutput(loss=loss, logits=None, visual_tokens=visual, token_nll=token_nll)
        out = self.lm(**lm_inputs)
        if labels is None:
            loss = None
        elif loss_weights is not None:
            loss, token_nll = causal_lm_loss_weighted(out.logits, labels, loss_weights)
        else:
            loss = causal_lm_loss(out.logits, labels, loss_reduction)
        return FlamingoOutput(loss=loss, logits=out.logits, cache=getattr(out, "cache", None), visual_tokens=visual, token_nll=token_nll)

    @property
    def fused_loss_supported(self) -> bool:
        """Whether the LM's logits are exactly its head applied to its base model's output (see
        :data:`~flamingo_vlm.modeling.loss.PLAIN_HEAD_MODEL_TYPES`), so the loss can be fused with the head."""
        return self.lm.config.model_type in PLAIN_HEAD_MODEL_TYPES and self.lm.base_model is not self.lm

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        media_kv: MediaKV | None = None,
        cache_media_kv: bool = True,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate through ``transformers``' ``generate`` (greedy, beam search, sampling, ...).

        The vision encoder and resampler run once per prompt medium (never once per beam); with
        ``cache_media_kv`` each block's media keys/values are computed once (or taken from ``media_kv``) and
        shared by every step and beam. Stops at ``<|endofchunk|>`` or the LM's EOS; ``<image>`` is never generated.
        Returns token ids [B * num_return_sequences, L + new] like ``transformers``.
        """
        visual, counts = self._visual_tokens(input_ids, pixel_values, frame_mask, vision_features, visual_tokens)
        if media_kv is None and visual is not None and cache_media_kv:
            media_kv = self.media_kv(visual)
        step_media = StepMedia(
            build=functools.partial(self.media_context, visual_tokens=visual, media_kv=media_kv),
            prompt_offsets=counts.cumsum(0) - counts,
        )
        if attention_mask is None:
            # as transformers does: padding is read from the pad id only where it cannot be a real EOS
            c = self.config
            if c.pad_token_id is not None and c.pad_token_id != c.eos_token_id:
                attention_mask = (input_ids != c.pad_token_id).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        beams = generate_kwargs.get("num_beams", 1) or 1
        # generate's default is the LM's generation config (MPT's says use_cache=False: a prompt cache handed to an
        # uncached generate would be appended to at every step)
        use_cache = generate_kwargs.get("use_cache", getattr(getattr(self.lm, "generation_config", None), "use_cache", True))
        if beams > 1 and input_ids.shape[1] > 1 and use_cache and "cache" not in generate_kwargs:
            # HF copies each prompt num_beams times before its first forward: run the prompt once per
            # prompt instead and hand generate the copied KV cache (it then runs only the last token).
            generate_kwargs["cache"] = self._prompt_cache(input_ids, attention_mask, step_media, beams)
        c = self.config
        stop = [c.end_of_chunk_token_id] + ([c.eos_token_id] if c.eos_token_id is not None else [])
        generate_kwargs.setdefault("eos_token_id", stop)
        generate_kwargs.setdefault("pad_token_id", c.pad_token_id)
        generate_kwargs.setdefault("suppress_tokens", [c.media_token_id])
        generate_kwargs[STEP_MEDIA_KWARG] = step_media
        return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def _prompt_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step_media: StepMedia, copies: int) -> Any:
        """The LM's KV cache of each prompt but its last token ([B, L-1] -> cache of B * copies rows, row-interleaved)."""
        prefix, prefix_mask = input_ids[:, :-1], attention_mask[:, :-1]
        kwargs: dict[str, Any] = {CONTEXT_KWARG: step_media.context(prefix, prefix.shape[1])}
        if "logits_to_keep" in inspect.signature(self.lm.forward).parameters:
            kwargs["logits_to_keep"] = 1  # only the cache is wanted
        positions = padded_position_ids(prefix_mask)
        if positions is not None:
            kwargs["position_ids"] = positions
        out = self.lm(input_ids=prefix, attention_mask=prefix_mask, use_cache=True, **kwargs)
        cache = out.cache
        cache.batch_repeat_interleave(copies)
        return cache

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, training: dict[str, Any] | None = None,
                        evaluation: dict[str, Any] | str | os.PathLike | None = None) -> None:
        """Write flamingo_config.json and model.safetensors (trained weights only), atomically, and a model
        card (README.md: backbones, bridge, and ``training`` (a TrainConfig dict) / ``evaluation`` (``flamingo
        eval``'s results, dict or JSON path) when given; see :mod:`flamingo_vlm.modeling.card`)."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.flamingo_state_dict().items()}
        tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
        save_file(state, tmp, metadata={"format": "pt", "library": "flamingo_vlm"})
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
        paths_for_saving(self.config, directory).save(directory)
        write_lm_signature(self.lm_signature(), directory)
        write_model_card(self, directory, training=training, evaluation=evaluation)

    def push_to_hub(self, repo_id: str, *, processor: Any = None, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload Flamingo bridge", training: dict[str, Any] | None = None,
                    evaluation: dict[str, Any] | str | os.PathLike | None = None) -> Any:
        """Upload what :meth:`save_pretrained` writes (card included; ``processor`` too, if given) to the hub
        repo ``repo_id`` through ``huggingface_hub`` (created if needed)."""
        return push_to_hub(self, repo_id, processor=processor, private=private, token=token, commit_message=commit_message,
                           training=training, evaluation=evaluation)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        lm: Any = None,
        vision: Any = None,
        lm_kwargs: dict[str, Any] | None = None,
        vision_kwargs: dict[str, Any] | None = None,
        check_lm: bool = True,
    ) -> FlamingoModel:
        """Rebuild from :meth:`save_pretrained`; backbones from the paths in the config unless given (a local
        path saved relative to ``directory`` is read from there).

        check_lm: refuse an LM that differs from the one the bridge was saved with (type, vocabulary rows,
        width, depth, weights); False for one you mean to use, e.g. a fine-tuned LM of the same shapes.
        """
        config = paths_after_loading(FlamingoConfig.load(directory), directory)
        lm_model, encoder = load_backbones(config, lm=lm, vision=vision, lm_kwargs=lm_kwargs, vision_kwargs=vision_kwargs)
        if check_lm:
            check_lm_signature(lm_model, find_decoder_layers(lm_model, config.decoder_layers_attr)[1], directory)
        model = cls(config, lm_model, encoder)
        model.load_flamingo_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=str(model.device)))
        model._set_trainable()
        return model
