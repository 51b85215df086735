"""Site adapters for torch's own transformer modules, torchvision's ViT and Swin, and BERT-style
Hugging Face encoders (see :mod:`mipprune.pruning.transformer_sites` for the contract).

Families and what ``prepare`` does to the copy it returns:

* ``nn.MultiheadAttention`` (self-attention: ``kdim = vdim = embed_dim``, without ``add_bias_kv`` /
  ``add_zero_attn``), alone or inside ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
  and torchvision's ViT ``EncoderBlock``. torch computes it in ``F.multi_head_attention_forward``
  with one packed ``in_proj_weight`` and ``embed_dim = num_heads · head_dim`` (a forward hook on
  ``out_proj`` never fires and the head count cannot shrink), so each one is replaced by
  :class:`PrunableMultiheadAttention`: the same computation with explicit ``q_proj``/``k_proj``/
  ``v_proj``/``out_proj`` ``nn.Linear`` layers, the same call signature (``key_padding_mask``,
  ``need_weights``, ``attn_mask`` 2-D or per-head 3-D, ``average_attn_weights``, ``is_causal``,
  batch-first or not, unbatched), and any head count. It exposes ``in_proj_bias = None``, which
  turns off the fused fast path of ``nn.TransformerEncoderLayer`` (it needs the packed weights), and
  an ``nn.TransformerEncoder`` that would have packed padded batches into nested tensors becomes a
  :class:`PrunableTransformerEncoder`, which gives the same outputs (zeros at padded positions)
  without nested tensors.
* torchvision's Swin ``ShiftedWindowAttention`` (V1: the relative-position bias table has one column
  per head; V2: cosine attention with a per-head ``logit_scale`` and a continuous position bias MLP
  with one output per head) becomes :class:`PrunableWindowAttention`, whose ``proj`` is called as a
  module and whose ``head_dim`` no longer has to be ``dim / num_heads``.
* MLP neurons: ``linear1``/``linear2`` of the torch layers, and an ``mlp`` ``nn.Sequential`` of two
  ``nn.Linear`` with only element-wise modules between them (torchvision's ``MLPBlock`` / ``MLP``:
  ``mlp[0]`` and ``mlp[3]``) in a block that has an attention.
* BERT-style Hugging Face encoders (BERT, RoBERTa, ELECTRA, … with ``attention.self.query/key/value``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``): already plain ``nn.Linear``,
  so ``prepare`` is a deep copy; surgery updates ``num_attention_heads`` / ``all_head_size`` of the
  self-attention module. Cross-attention layers of BERT decoders are left whole.

torchvision and transformers are never imported here: their modules are recognised by class name
and attributes, so a model built without them (or a hand-built equivalent) goes through the same
code. The residual stream is never a site.
"""
from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mipprune.pruning.transformer_hf import record_sizes
from mipprune.pruning.transformer_sites import Site, _rows, check_keep
from solvers.errors import InvalidInputError, UnsupportedLayerError

__all__ = ["ADAPTERS", "BertAdapter", "PrunableMultiheadAttention", "PrunableTransformerEncoder",
           "PrunableWindowAttention", "TorchTransformerAdapter"]


# --------------------------------------------------------------------------- explicit attention
class PrunableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention) with explicit projections and any head count.

    ``q_proj``, ``k_proj``, ``v_proj``: ``nn.Linear(embed_dim, num_heads · head_dim)``;
    ``out_proj``: ``nn.Linear(num_heads · head_dim, embed_dim)``. ``head_index`` lists, for each
    remaining head, its index in the original module, so that a per-head 3-D ``attn_mask`` of shape
    ``(N · original_heads, L, S)`` keeps working after heads are removed.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)`` exactly as
    ``nn.MultiheadAttention`` does (shapes ``(L, N, E)`` or ``(N, L, E)`` with ``batch_first``, or
    ``(L, E)`` unbatched); the averaged weights average over the remaining heads.
    """

    # attributes that torch's transformer layers read from their ``self_attn`` (fast-path checks):
    # no packed in-projection, so those fast paths are never taken
    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.kdim, self.vdim = embed_dim, embed_dim, embed_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        self.original_heads = num_heads
        self.head_index = list(range(num_heads))

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, name: str = "") -> "PrunableMultiheadAttention":
        """The equivalent of ``mha`` (weights copied; raises ``UnsupportedLayerError`` for
        cross-attention with ``kdim``/``vdim`` ≠ ``embed_dim``, ``add_bias_kv`` or ``add_zero_attn``)."""
        _check_mha(mha, name)
        e, w = mha.embed_dim, mha.in_proj_weight
        new = cls(e, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None, dropout=mha.dropout,
                  batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(w[i * e:(i + 1) * e])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        for proj in (new.q_proj, new.k_proj, new.v_proj):
            proj.requires_grad_(w.requires_grad)
        new.out_proj.requires_grad_(mha.out_proj.weight.requires_grad)
        new.train(mha.training)
        return new

    @property
    def whole(self) -> bool:
        """True while every original head is still there (in order)."""
        return self.head_index == list(range(self.original_heads))

    def to_module(self) -> nn.MultiheadAttention | None:
        """The equivalent ``nn.MultiheadAttention`` (only while :attr:`whole`: torch's module cannot
        hold fewer heads than ``embed_dim / head_dim``), or None when torch's module cannot hold
        these parameters (an output bias without input biases)."""
        if not self.whole:
            raise InvalidInputError(f"attention must keep all {self.original_heads} heads to become an "
                                    f"nn.MultiheadAttention again; got {self.num_heads}")
        w = self.q_proj.weight
        bias = self.q_proj.bias is not None
        if (self.out_proj.bias is not None) != bias:  # e.g. an output bias added by pruning (bias compensation)
            return None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=bias,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            if bias:
                mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if bias:
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.in_proj_weight.requires_grad_(w.requires_grad)
        mha.train(self.training)
        return mha

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, _ = query.shape
        src = key.shape[1]
        # the mask conventions of F.multi_head_attention_forward (bool: True = masked; float: added)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise InvalidInputError("attn_mask must be given with is_causal=True (the hint does not replace the "
                                    "mask; see nn.Transformer.generate_square_subsequent_mask); got None")
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt, src):
                    raise InvalidInputError(f"attn_mask must have shape ({tgt}, {src}) (target × source length); "
                                            f"got {tuple(attn_mask.shape)}")
                mask = attn_mask.view(1, 1, tgt, src)
            elif attn_mask.dim() == 3:
                want = (n * self.original_heads, tgt, src)
                if tuple(attn_mask.shape) != want:
                    raise InvalidInputError(f"a 3-D attn_mask must have shape {want} (batch · heads of the "
                                            f"original module, target, source); got {tuple(attn_mask.shape)}")
                mask = attn_mask.view(n, self.original_heads, tgt, src)
                if self.head_index != list(range(self.original_heads)):
                    mask = mask[:, torch.as_tensor(self.head_index, device=mask.device)]
            else:
                raise InvalidInputError(f"attn_mask must be 2-D or 3-D; got {attn_mask.dim()}-D")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (n, src):
                raise InvalidInputError(f"key_padding_mask must have shape ({n}, {src}) (batch × source length); "
                                        f"got {tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(n, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(F.dropout(weights, p=p) if p > 0 else weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, h * d))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class PrunableTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` over layers with :class:`PrunableMultiheadAttention`.

    torch's encoder packs a padded batch into a nested tensor when it can (eval mode, a
    ``src_key_padding_mask``, no gradient needed …) and then returns zeros at the padded positions.
    This class takes the same decision from the same conditions but runs the layers on the padded
    tensor (with the mask) and zeros the padded positions itself: the same outputs, while the
    attention stays hookable and prunable.
    """

    def _packs(self, src: torch.Tensor, mask, kpm) -> bool:
        """Whether ``nn.TransformerEncoder.forward`` would have taken its nested-tensor path."""
        first = self.layers[0]
        if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "packs_padding", False)
                and not first.training and src.dim() == 3 and kpm is not None and mask is None
                and not src.is_nested and not torch.is_autocast_enabled()):
            return False
        check = getattr(self, "mask_check", True)
        if check and (torch.compiler.is_compiling()
                      or not torch._nested_tensor_from_mask_left_aligned(src, kpm.logical_not())):
            return False
        tensors = [src] + [t for t in first.parameters()]
        if torch.overrides.has_torch_function(tensors):
            return False
        if src.device.type not in ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

        kpm = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        packs = self._packs(src, mask, kpm)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.layers[0].self_attn.batch_first))
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=kpm)
        if packs:
            out = out.masked_fill((kpm != 0).unsqueeze(-1), 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out


def _window_attention_kind(module: nn.Module) -> str | None:
    """``"v1"`` / ``"v2"`` for torchvision's (Swin) ``ShiftedWindowAttention`` / ``…V2``, else None."""
    cls = type(module).__name__
    if cls not in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
        return None
    if not (isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear)
            and hasattr(module, "relative_position_index") and hasattr(module, "num_heads")):
        return None
    return "v2" if hasattr(module, "logit_scale") and hasattr(module, "cpb_mlp") else "v1"


class PrunableWindowAttention(nn.Module):
    """Swin's shifted-window attention (torchvision's ``shifted_window_attention``), V1 or V2, with
    ``proj`` called as a module and ``head_dim`` independent of the channels.

    Parameters keep torchvision's names (``qkv``, ``proj``, ``relative_position_bias_table`` (V1),
    ``logit_scale`` and ``cpb_mlp`` (V2)); ``qkv`` has ``3 · num_heads · head_dim`` outputs (q heads,
    then k heads, then v heads). Input and output ``(B, H, W, C)``.
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        kind = _window_attention_kind(source)
        if kind is None:
            raise UnsupportedLayerError(f"source must be torchvision's ShiftedWindowAttention(V2); "
                                        f"got {type(source).__name__}")
        self.version = kind
        self.window_size = list(source.window_size)
        self.shift_size = list(source.shift_size)
        self.num_heads = int(source.num_heads)
        if source.qkv.out_features % (3 * self.num_heads):
            raise UnsupportedLayerError(f"ShiftedWindowAttention qkv must have 3 · num_heads · head_dim outputs; "
                                        f"got {source.qkv.out_features} with num_heads={self.num_heads}")
        self.head_dim = source.qkv.out_features // (3 * self.num_heads)
        if source.proj.in_features != self.num_heads * self.head_dim:
            raise UnsupportedLayerError(f"ShiftedWindowAttention proj must read num_heads · head_dim = "
                                        f"{self.num_heads * self.head_dim} inputs; got {source.proj.in_features}")
        self.attention_dropout = float(source.attention_dropout)
        self.dropout = float(source.dropout)
        self.qkv = copy.deepcopy(source.qkv)
        self.proj = copy.deepcopy(source.proj)
        self.register_buffer("relative_position_index", source.relative_position_index.clone())
        if kind == "v1":
            self.relative_position_bias_table = copy.deepcopy(source.relative_position_bias_table)
        else:
            self.logit_scale = copy.deepcopy(source.logit_scale)
            self.cpb_mlp = copy.deepcopy(source.cpb_mlp)
            self.register_buffer("relative_coords_table", source.relative_coords_table.clone())
        self.train(source.training)

    def extra_repr(self) -> str:
        return (f"version={self.version}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window={self.window_size}")

    def relative_position_bias(self) -> torch.Tensor:
        """(1, num_heads, N, N) with N = window area."""
        n = self.window_size[0] * self.window_size[1]
        table = (self.relative_position_bias_table if self.version == "v1"
                 else self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return bias if self.version == "v1" else 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws, heads, hd = self.window_size, self.num_heads, self.head_dim
        b, hgt, wid, c = x.shape
        pad_r = (ws[1] - wid % ws[1]) % ws[1]
        pad_b = (ws[0] - hgt % ws[0]) % ws[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, ph, pw, _ = x.shape
        shift = list(self.shift_size)
        if ws[0] >= ph:
            shift[0] = 0
        if ws[1] >= pw:
            shift[1] = 0
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        n_win = (ph // ws[0]) * (pw // ws[1])
        x = x.view(b, ph // ws[0], ws[0], pw // ws[1], ws[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * n_win, ws[0] * ws[1], c)
        qkv_bias = self.qkv.bias
        if self.version == "v2" and qkv_bias is not None:  # V2 has no key bias (zeroed on every call)
            inner = heads * hd
            qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]), qkv_bias[2 * inner:]])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.version == "v2":
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.relative_position_bias()
        if sum(shift) > 0:
            mask = x.new_zeros((ph, pw))
            h_slices = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
            w_slices = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
            count = 0
            for hs in h_slices:
                for wsl in w_slices:
                    mask[hs[0]:hs[1], wsl[0]:wsl[1]] = count
                    count += 1
            mask = mask.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(n_win, ws[0] * ws[1])
            mask = mask.unsqueeze(1) - mask.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
            attn = attn.view(x.size(0) // n_win, n_win, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, x.size(1), x.size(1))
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * hd)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        c_out = x.shape[-1]
        x = x.view(b, ph // ws[0], pw // ws[1], ws[0], ws[1], c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :hgt, :wid, :].contiguous()


# --------------------------------------------------------------------------- surgery helpers
def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output rows ``rows`` of a producer ``nn.Linear`` (weight and bias)."""
    _set_tensor(linear, "weight", _rows(linear.weight, rows))
    if linear.bias is not None:
        _set_tensor(linear, "bias", _rows(linear.bias, rows))
    linear.out_features = int(rows.numel())


def _check_surgery(site: Site, current_units: int, consumer: nn.Linear, keep, weight, bias
                   ) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """Validated ``(keep, new consumer weight (out, kept cols) or None, new bias or None)``; raises
    ``InvalidInputError`` before anything is modified."""
    if current_units != site.n_units or consumer.in_features != site.n_columns:
        raise InvalidInputError(
            f"site {site.name!r} was listed for {site.n_units} {site.kind}; the module now has {current_units} "
            "(apply each listed site once, and list the sites again after pruning)")
    arr = check_keep(site, keep)
    w = consumer.weight
    out = w.shape[0]
    new_w = new_b = None
    if weight is not None:
        a = np.asarray(weight, dtype=np.float64)
        cols = arr.size * site.unit_columns
        if a.shape != (cols, out):
            raise InvalidInputError(f"weight of site {site.name!r} must have shape ({cols}, {out}) (kept columns × "
                                    f"outputs of {site.consumer!r}); got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise InvalidInputError(f"weight of site {site.name!r} must be finite; got NaN or inf entries")
        new_w = torch.as_tensor(a.T.copy(), dtype=w.dtype, device=w.device)
    if bias is not None:
        bv = np.asarray(bias, dtype=np.float64)
        if bv.shape != (out,):
            raise InvalidInputError(f"bias of site {site.name!r} must have shape ({out},); got {bv.shape}")
        if not np.all(np.isfinite(bv)):
            raise InvalidInputError(f"bias of site {site.name!r} must be finite; got NaN or inf entries")
        new_b = torch.as_tensor(bv, dtype=w.dtype, device=w.device)
    return arr, new_w, new_b


def _unit_columns(keep: np.ndarray, per_unit: int, device) -> torch.Tensor:
    cols = (keep[:, None] * per_unit + np.arange(per_unit)[None, :]).reshape(-1)
    return torch.as_tensor(cols, dtype=torch.long, device=device)


def _rewrite_consumer(consumer: nn.Linear, cols: torch.Tensor, new_w, new_b) -> None:
    """Keep input columns ``cols`` of the consumer, or write ``new_w``; ``new_b`` replaces its bias."""
    _set_tensor(consumer, "weight", _rows(consumer.weight, cols, dim=1) if new_w is None else new_w)
    consumer.in_features = int(cols.numel())
    if new_b is not None:
        if consumer.bias is None:
            consumer.bias = nn.Parameter(new_b, requires_grad=consumer.weight.requires_grad)
        else:
            _set_tensor(consumer, "bias", new_b)


def _qualified(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


# --------------------------------------------------------------------------- sites
_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Hardswish,
                nn.ReLU6, nn.Dropout, nn.Identity)


def _mlp_pair(mlp: nn.Module) -> tuple[int, int] | None:
    """Indices of the two ``nn.Linear`` of an ``nn.Sequential`` MLP with only element-wise modules
    around and between them (torchvision's MLPBlock: 0 and 3), else None."""
    if not isinstance(mlp, nn.Sequential):
        return None
    mods = list(mlp)
    lin = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    if len(lin) != 2 or any(not isinstance(m, _ELEMENTWISE) for i, m in enumerate(mods) if i not in lin):
        return None
    a, b = mods[lin[0]], mods[lin[1]]
    return (lin[0], lin[1]) if a.out_features == b.in_features else None


def _weights_of(prepared: nn.Module, names: list[str]) -> list[torch.Tensor]:
    return [prepared.get_submodule(n).weight.detach() for n in names]


def _qkv_chunks(prepared: nn.Module, name: str) -> list[torch.Tensor]:
    return list(prepared.get_submodule(name).weight.detach().chunk(3, dim=0))


def _attention_flops(seq_len: int, *, e: int, d: int, out: int, span: int | None = None) -> int:
    """MACs per token of one head: its q/k/v rows, its output-projection columns, and the scores and
    weighted sum over ``span`` keys (the sequence length, or a Swin window's area)."""
    return 3 * e * d + d * out + 2 * int(seq_len if span is None else span) * d


def _mlp_flops(seq_len: int, *, value: int) -> int:
    return value


def _module_at(model: nn.Module, site: Site, name: str, kind: type) -> nn.Module:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, kind):
        raise InvalidInputError(f"model must be the prepared copy that site {site.name!r} was listed from "
                                f"({kind.__name__} at {name!r}); got {type(mod).__name__}")
    return mod


def _mha_site(name: str, block: str, m: PrunableMultiheadAttention) -> Site:
    e, d, out = m.embed_dim, m.head_dim, m.out_proj.out_features
    bias = 3 * d if m.q_proj.bias is not None else 0
    site = Site(
        kind="heads", name=name, block=block, consumer=_qualified(name, "out_proj"), n_units=m.num_heads,
        unit_columns=d, params_per_unit=3 * e * d + bias + d * out,
        flops_per_unit=partial(_attention_flops, e=e, d=d, out=out), apply=None,
        info={"family": "torch", "unit": "head", "heads": m.num_heads, "head_dim": d, "embed_dim": e},
        producer_weights=partial(_weights_of, names=[_qualified(name, p) for p in ("q_proj", "k_proj", "v_proj")]))
    site.apply = partial(_apply_mha, site=site)
    return site


def _apply_mha(model: nn.Module, keep, weight=None, bias=None, *, site: Site) -> None:
    mod = _module_at(model, site, site.name, PrunableMultiheadAttention)
    keep, new_w, new_b = _check_surgery(site, mod.num_heads, mod.out_proj, keep, weight, bias)
    rows = _unit_columns(keep, mod.head_dim, mod.out_proj.weight.device)
    for proj in (mod.q_proj, mod.k_proj, mod.v_proj):
        _keep_rows(proj, rows)
    _rewrite_consumer(mod.out_proj, rows, new_w, new_b)
    mod.num_heads = int(keep.size)
    mod.head_index = [mod.head_index[i] for i in keep]
    block = model.get_submodule(site.block)
    if isinstance(getattr(block, "num_heads", None), int):  # torchvision's ViT EncoderBlock records it
        block.num_heads = mod.num_heads


def _last_linear(seq: nn.Module) -> nn.Linear:
    return [m for m in seq.modules() if isinstance(m, nn.Linear)][-1]


def _window_site(name: str, block: str, m: PrunableWindowAttention) -> Site:
    c, d, out = m.qkv.in_features, m.head_dim, m.proj.out_features
    if m.version == "v1":
        extra = m.relative_position_bias_table.shape[0]  # the head's column of the table
    else:
        last = _last_linear(m.cpb_mlp)  # the head's logit scale and its output row of the position MLP
        extra = 1 + last.in_features + (last.bias is not None)
    bias = 3 * d if m.qkv.bias is not None else 0
    site = Site(
        kind="heads", name=name, block=block, consumer=_qualified(name, "proj"), n_units=m.num_heads,
        unit_columns=d, params_per_unit=3 * c * d + bias + d * out + extra,
        # attention spans one window whatever the image size
        flops_per_unit=partial(_attention_flops, e=c, d=d, out=out, span=m.window_size[0] * m.window_size[1]),
        apply=None,
        info={"family": "swin", "unit": "head", "version": m.version, "heads": m.num_heads, "head_dim": d,
              "window": list(m.window_size)},
        producer_weights=partial(_qkv_chunks, name=_qualified(name, "qkv")))
    site.apply = partial(_apply_window, site=site)
    return site


def _apply_window(model: nn.Module, keep, weight=None, bias=None, *, site: Site) -> None:
    mod = _module_at(model, site, site.name, PrunableWindowAttention)
    keep, new_w, new_b = _check_surgery(site, mod.num_heads, mod.proj, keep, weight, bias)
    dev = mod.proj.weight.device
    cols = _unit_columns(keep, mod.head_dim, dev)
    inner = mod.num_heads * mod.head_dim
    _keep_rows(mod.qkv, torch.cat([cols, cols + inner, cols + 2 * inner]))
    _rewrite_consumer(mod.proj, cols, new_w, new_b)
    heads = torch.as_tensor(keep, dtype=torch.long, device=dev)
    if mod.version == "v1":
        _set_tensor(mod, "relative_position_bias_table", _rows(mod.relative_position_bias_table, heads, dim=1))
    else:
        _set_tensor(mod, "logit_scale", _rows(mod.logit_scale, heads))
        _keep_rows(_last_linear(mod.cpb_mlp), heads)
    mod.num_heads = int(keep.size)


def _mlp_site(name: str, block: str, producer: str, consumer: str, up: nn.Linear, down: nn.Linear,
              family: str) -> Site:
    e, out = up.in_features, down.out_features
    site = Site(
        kind="neurons", name=name, block=block, consumer=consumer, n_units=up.out_features, unit_columns=1,
        params_per_unit=e + (1 if up.bias is not None else 0) + out,
        flops_per_unit=partial(_mlp_flops, value=e + out), apply=None,
        info={"family": family, "unit": "neuron", "neurons": up.out_features, "producer": producer},
        producer_weights=partial(_weights_of, names=[producer]))
    site.apply = partial(_apply_mlp, site=site, producer=producer)
    return site


def _apply_mlp(model: nn.Module, keep, weight=None, bias=None, *, site: Site, producer: str) -> None:
    up = _module_at(model, site, producer, nn.Linear)
    cons = _module_at(model, site, site.consumer, nn.Linear)
    keep, new_w, new_b = _check_surgery(site, up.out_features, cons, keep, weight, bias)
    rows = torch.as_tensor(keep, dtype=torch.long, device=cons.weight.device)
    _keep_rows(up, rows)
    _rewrite_consumer(cons, rows, new_w, new_b)


# --------------------------------------------------------------------------- torch / torchvision adapter
def _attention_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in module.named_children()
            if isinstance(c, (PrunableMultiheadAttention, PrunableWindowAttention))]


class TorchTransformerAdapter:
    """``nn.MultiheadAttention`` / ``nn.Transformer{Encoder,Decoder}Layer`` / ``nn.TransformerEncoder``,
    torchvision's ViT ``EncoderBlock`` and Swin blocks (V1 and V2)."""

    family = "torch"

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, (nn.MultiheadAttention, PrunableMultiheadAttention, PrunableWindowAttention))
                   or _window_attention_kind(m) is not None for m in model.modules())

    def prepare(self, model: nn.Module) -> nn.Module:
        """A deep copy with every self-attention replaced by its explicit equivalent (the model is not
        modified). Raises ``UnsupportedLayerError`` for attention it cannot prune (cross-attention with
        other key/value widths, ``add_bias_kv``, ``add_zero_attn``)."""
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        for name, m in model.named_modules():  # refuse before copying anything
            if isinstance(m, nn.MultiheadAttention) and type(m) is not nn.MultiheadAttention:
                raise UnsupportedLayerError(f"{name!r} is a subclass of nn.MultiheadAttention ({type(m).__name__}); "
                                            "only nn.MultiheadAttention itself can have its heads pruned")
            if isinstance(m, nn.MultiheadAttention):
                _check_mha(m, name)
        work = copy.deepcopy(model)
        for name, m in list(work.named_modules()):
            for child_name, child in list(m.named_children()):
                full = _qualified(name, child_name)
                if isinstance(child, nn.MultiheadAttention):
                    setattr(m, child_name, PrunableMultiheadAttention.from_module(child, full))
                elif _window_attention_kind(child) is not None:
                    setattr(m, child_name, PrunableWindowAttention(child))
        for m in work.modules():
            if type(m) is nn.TransformerEncoder:
                m.packs_padding = bool(getattr(m, "use_nested_tensor", False))
                m.use_nested_tensor = False
                m.__class__ = PrunableTransformerEncoder
        return work

    def sites(self, prepared: nn.Module) -> list[Site]:
        """Heads and MLP sites in forward order; ``prepared`` must come from :meth:`prepare`."""
        for name, m in prepared.named_modules():
            if isinstance(m, nn.MultiheadAttention) or _window_attention_kind(m) is not None:
                raise InvalidInputError(f"model must be the output of prepare() (explicit attention); got "
                                        f"{type(m).__name__} at {name!r}")
        out: list[Site] = []
        for name, m in prepared.named_modules():
            attns = _attention_children(m)
            for child_name, attn in attns:
                full = _qualified(name, child_name)
                if isinstance(attn, PrunableMultiheadAttention):
                    out.append(_mha_site(full, name, attn))
                else:
                    out.append(_window_site(full, name, attn))
            if not attns:
                continue
            if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                out.append(_mlp_site(_qualified(name, "linear1"), name, _qualified(name, "linear1"),
                                     _qualified(name, "linear2"), m.linear1, m.linear2, "torch"))
            elif (pair := _mlp_pair(getattr(m, "mlp", None))) is not None:
                mlp = _qualified(name, "mlp")
                out.append(_mlp_site(mlp, name, f"{mlp}.{pair[0]}", f"{mlp}.{pair[1]}", m.mlp[pair[0]],
                                     m.mlp[pair[1]], "torchvision"))
        return out

    def finish(self, prepared: nn.Module) -> nn.Module:
        """Hand back torch's own modules where they can hold the result: every
        :class:`PrunableMultiheadAttention` that kept all its heads becomes an ``nn.MultiheadAttention``
        again (so torch's fused fast paths are used), and an encoder whose layers all have one
        again an ``nn.TransformerEncoder``. Attention with pruned heads stays explicit."""
        for _, m in list(prepared.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, PrunableMultiheadAttention) and child.whole:
                    mha = child.to_module()
                    if mha is not None:
                        setattr(m, child_name, mha)
        for m in prepared.modules():
            if type(m) is PrunableTransformerEncoder and all(
                    type(layer.self_attn) is nn.MultiheadAttention for layer in m.layers):
                m.__class__ = nn.TransformerEncoder
                m.use_nested_tensor = m.__dict__.pop("packs_padding", False)
        return prepared


def _check_mha(m: nn.MultiheadAttention, name: str) -> None:
    where = f"nn.MultiheadAttention {name!r}" if name else "nn.MultiheadAttention"
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        raise UnsupportedLayerError(
            f"{where} must be self-attention with kdim = vdim = embed_dim = {m.embed_dim} to have its heads "
            f"pruned; got kdim={m.kdim}, vdim={m.vdim}")
    if m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedLayerError(
            f"{where} must have add_bias_kv=False and add_zero_attn=False to have its heads pruned; "
            f"got add_bias_kv={m.bias_k is not None}, add_zero_attn={m.add_zero_attn}")


# --------------------------------------------------------------------------- BERT-style encoders
def _bert_layer_parts(m: nn.Module):
    """``(self_attention, attention_output_dense, intermediate_dense, output_dense)`` of a BERT-style
    layer, or None."""
    attn = getattr(m, "attention", None)
    inter, output = getattr(m, "intermediate", None), getattr(m, "output", None)
    sa = getattr(attn, "self", None) if attn is not None else None
    if sa is None or inter is None or output is None:
        return None
    lin = [getattr(sa, n, None) for n in ("query", "key", "value")]
    dense = [getattr(getattr(attn, "output", None), "dense", None), getattr(inter, "dense", None),
             getattr(output, "dense", None)]
    if not all(isinstance(x, nn.Linear) for x in lin + dense):
        return None
    if not all(isinstance(getattr(sa, a, None), int) for a in ("num_attention_heads", "attention_head_size")):
        return None
    return sa, dense[0], dense[1], dense[2]


class BertAdapter:
    """BERT-style Hugging Face encoders (``BertModel``, ``BertFor…``, RoBERTa, ELECTRA, …)."""

    family = "bert"

    def matches(self, model: nn.Module) -> bool:
        return any(_bert_layer_parts(m) is not None for m in model.modules())

    def prepare(self, model: nn.Module) -> nn.Module:
        """A deep copy: BERT's projections are already hookable ``nn.Linear`` layers."""
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        return copy.deepcopy(model)

    def sites(self, prepared: nn.Module) -> list[Site]:
        out: list[Site] = []
        for name, m in prepared.named_modules():
            parts = _bert_layer_parts(m)
            if parts is None:
                continue
            sa, o_dense, i_dense, out_dense = parts
            out.append(self._heads(name, sa, o_dense))
            out.append(_mlp_site(_qualified(name, "intermediate"), name, _qualified(name, "intermediate.dense"),
                                 _qualified(name, "output.dense"), i_dense, out_dense, "bert"))
        return out

    def finish(self, prepared: nn.Module) -> nn.Module:
        """Write the pruned sizes into ``prepared.config`` (the convention of
        :func:`mipprune.pruning.transformer_hf.record_sizes`): ``intermediate_size`` when every layer
        keeps the same number of neurons, and ``mipprune_layer_sizes`` always. BERT derives the head
        size from ``hidden_size / num_attention_heads``, so pruned heads cannot be said in the
        stock fields: such a model loads with ``mipprune.load_pruned(folder)``, a model with all heads
        and uniform MLPs with the stock ``from_pretrained`` as well."""
        cfg = getattr(prepared, "config", None)
        sites = self.sites(prepared)
        if cfg is None or not sites:
            return prepared
        heads_whole = all(s.n_units == getattr(cfg, "num_attention_heads", -1) for s in sites if s.kind == "heads")
        widths = {s.n_units for s in sites if s.kind == "neurons"}
        if len(widths) == 1 and hasattr(cfg, "intermediate_size"):
            cfg.intermediate_size = widths.pop()
            uniform = True
        else:
            uniform = False
        record_sizes(prepared, sites, from_pretrained=heads_whole and uniform)
        return prepared

    def _heads(self, layer: str, sa: nn.Module, dense: nn.Linear) -> Site:
        e, d, out = sa.query.in_features, sa.attention_head_size, dense.out_features
        name, sa_name = _qualified(layer, "attention"), _qualified(layer, "attention.self")
        bias = 3 * d if sa.query.bias is not None else 0
        site = Site(
            kind="heads", name=name, block=layer, consumer=_qualified(layer, "attention.output.dense"),
            n_units=sa.num_attention_heads, unit_columns=d, params_per_unit=3 * e * d + bias + d * out,
            flops_per_unit=partial(_attention_flops, e=e, d=d, out=out), apply=None,
            info={"family": "bert", "unit": "head", "heads": sa.num_attention_heads, "head_dim": d, "hidden": e},
            producer_weights=partial(_weights_of, names=[f"{sa_name}.{p}" for p in ("query", "key", "value")]))
        site.apply = partial(_apply_bert_heads, site=site)
        return site


def _apply_bert_heads(model: nn.Module, keep, weight=None, bias=None, *, site: Site) -> None:
    layer = _module_at(model, site, site.block, nn.Module)
    parts = _bert_layer_parts(layer)
    if parts is None:
        raise InvalidInputError(f"model must be the prepared copy that site {site.name!r} was listed from "
                                f"(a BERT-style layer at {site.block!r}); got {type(layer).__name__}")
    mod, cons = parts[0], parts[1]
    keep, new_w, new_b = _check_surgery(site, mod.num_attention_heads, cons, keep, weight, bias)
    rows = _unit_columns(keep, mod.attention_head_size, cons.weight.device)
    for p in ("query", "key", "value"):
        _keep_rows(getattr(mod, p), rows)
    _rewrite_consumer(cons, rows, new_w, new_b)
    mod.num_attention_heads = int(keep.size)
    mod.all_head_size = int(keep.size) * mod.attention_head_size


ADAPTERS = [BertAdapter(), TorchTransformerAdapter()]
