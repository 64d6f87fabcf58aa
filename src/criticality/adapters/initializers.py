"""How models from other packages initialize themselves, one module at a time (for fresh draws).

Re-randomization draws a group anew "as a freshly built model would". Models this project did not
build carry their own initializer; these functions apply it to *one* module (its own tensors, and what
its init writes into its children, as the package does), so :mod:`criticality.surgery` can draw a
group module by module:

- ``hf`` (:func:`hf_init`): Hugging Face ``PreTrainedModel._init_weights(module)`` of the nearest
  ``PreTrainedModel`` that contains the module (composite models dispatch to their sub-models' own
  init, as ``post_init`` does; a module of a user's wrapper, outside any HF model, gets its own
  ``reset_parameters``). Transformers 5 skips tensors flagged ``_is_hf_initialized``: the flags are
  cleared first. Norm layers get weight 1 / bias 0 before (their construction values; older Llama
  ``_init_weights`` leaves RMSNorm alone). GPT-2's ``c_proj`` weights get std 0.02/√(2·n_layer)
  because the init runs on the real ``GPT2Attention``/``GPT2MLP`` modules after their children.
- ``timm`` (:func:`timm_init`): the patterns of timm's ``init_weights`` for its ViT and ResNet
  families. A timm model whose file has its own per-module init (a ``_init_weights`` method or function:
  ConvNeXt, MetaFormer/PoolFormer, LeViT, RegNet, ResNetV2, EVA, Swin V2, ...) gets each module's
  ``reset_parameters()`` and then that init, as its constructor does. Otherwise:
  ViTs (a model with ``pos_embed`` or ``cls_token``): ``nn.Linear`` trunc-normal std 0.02
  with zero bias, the patch-embedding conv torch's default; CNNs: ``nn.Conv2d`` weights kaiming-normal
  (fan-out, ReLU), the classifier torch's default. Raw parameters ``pos_embed*`` and
  ``absolute_pos_embed`` trunc-normal std 0.02; ``cls_token``, ``reg_token`` normal std 1e-6 as in timm's
  ``VisionTransformer`` (DeiT's ``dist_token`` trunc-normal std 0.02), trunc-normal std 0.02 in the ViTs
  that draw them so (EVA, BEiT, CaiT, XCiT, ...: ``TRUNC_TOKENS``); every other module its own
  ``reset_parameters()`` (timm 1.0's attention modules draw their relative-position tables and attention
  biases there) or, below the root, ``init_weights()``.
  A parameter (of more than one value) that is constant in the run's epoch-0 checkpoint was set to that
  constant at construction, since no random draw is constant: it gets it (ConvNeXt's ``gamma``, CaiT/EVA's
  ``gamma_1``, XCiT's ``gamma1``, MetaFormer's ``layer_scale1.scale``, StarReLU's ``scale``/``bias``,
  LeViT's residual BatchNorm weights 0 and head biases 0; :func:`construction_constant`); one nothing draws
  and no checkpoint tells gets its constructor argument's default (``ls_init_value``, ...). Then a
  block's ``zero_init_last()`` when it has one (timm ResNets: the last BatchNorm of each residual branch
  gets weight 0, so a fresh draw of such a block is an *identity* residual branch — re-randomizing it
  equals skipping its branch; see :func:`identity_blocks`).

Both register themselves with :func:`criticality.core.initializers.register` when this module is imported
(``import criticality.adapters`` does it), with their detectors (:func:`is_hf`, :func:`is_timm`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

from criticality.core.initializers import DrawScheme, Members, draws_summary, initial_value, register
from criticality.core.stacks import is_norm

__all__ = ["construction_constant", "draws_summary", "hf_init", "identity_blocks", "is_hf", "is_timm", "timm_init"]

TOKENS = ("cls_token", "reg_token", "dist_token")  # see _token
# timm model classes whose init draws the class / register tokens trunc-normal std 0.02 (not normal std 1e-6)
TRUNC_TOKENS = ("Beit", "Cait", "CoaT", "ConVit", "Eva", "PoolingVisionTransformer", "TNT", "VOLO", "Xcit")
TIMM_STD = 0.02
# A constant raw parameter's name (trailing digits and _ dropped) → the constructor arguments that set its value
CONSTANT_ARGS = {"gamma": ("ls_init_value", "init_values", "layer_scale_init_value", "eta"),
                 "scale": ("init_value", "scale_value", "layer_scale_init_value"), "bias": ("bias_value",)}


def is_hf(model: nn.Module) -> bool:
    """A Hugging Face transformers model (``PreTrainedModel``), without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def is_timm(model: nn.Module) -> bool:
    """A timm model: its class comes from timm, or it carries timm's ``pretrained_cfg``."""
    return type(model).__module__.startswith("timm.") or "pretrained_cfg" in vars(type(model)) \
        or "pretrained_cfg" in vars(model)


def hf_init(module: nn.Module, path: str, root: nn.Module) -> None:
    """One module drawn by the ``_init_weights`` of the nearest ``PreTrainedModel`` that contains it."""
    owner = None
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        candidate = root.get_submodule(".".join(parts[:i]))
        if is_hf(candidate):
            owner = candidate
    _clear_hf_flags(module)
    if is_norm(module):
        _norm_defaults(module)
    if owner is not None:
        owner._init_weights(module)
    elif callable(getattr(module, "reset_parameters", None)):  # outside any HF model (a user's wrapper)
        module.reset_parameters()


def _clear_hf_flags(module: nn.Module) -> None:
    if "_is_hf_initialized" in vars(module):
        del module._is_hf_initialized
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if hasattr(t, "_is_hf_initialized"):
            del t._is_hf_initialized


def _norm_defaults(module: nn.Module) -> None:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor):
        nn.init.ones_(weight)
    if isinstance(bias, torch.Tensor):
        nn.init.zeros_(bias)
    if callable(getattr(module, "reset_running_stats", None)):
        module.reset_running_stats()


def timm_init(module: nn.Module, path: str, root: nn.Module) -> None:
    """One module drawn as timm's ``init_weights`` would (see the module docstring)."""
    vit = hasattr(root, "pos_embed") or hasattr(root, "cls_token")  # timm's ViT family; else its CNNs
    family = _family_init(root)
    if family is not None:
        _own_init(module, path)
        family(module, path)
    elif vit and isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=TIMM_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif not vit and isinstance(module, nn.Conv2d):
        module.reset_parameters()  # the bias (if any) as torch draws it; timm redraws the weight only
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    else:
        _own_init(module, path)
    for name, p in module.named_parameters(recurse=False):
        if name.startswith(("pos_embed", "absolute_pos_embed")):
            nn.init.trunc_normal_(p, std=TIMM_STD)
        elif name in TOKENS:
            _token(p, name, root)
        elif p.is_floating_point() and (p.numel() > 1 or p.isnan().all()):  # NaN: surgery's undrawn marker
            value = construction_constant(module, f"{path}.{name}" if path else name, name, bool(p.isnan().all()))
            if value is not None:
                nn.init.constant_(p, value)
    if callable(getattr(module, "zero_init_last", None)):
        module.zero_init_last()


def _own_init(module: nn.Module, path: str) -> None:
    for name in ("reset_parameters", "_reset_parameters", *(("init_weights",) if path else ())):
        if callable(getattr(module, name, None)):
            getattr(module, name)()
            return


def _family_init(root: nn.Module) -> Callable[[nn.Module, str], None] | None:
    """The per-module init a timm model's file applies after construction, when it has one: EfficientNet's
    and MobileNetV3's ``_init_weight_goog`` (normal with std √(2 / fan-out), fan-out per group), the ViT
    init for files built on it (Swin: linears trunc-normal std 0.02), the model's ``_init_weights(m)``
    method (MetaFormer, LeViT, ViT), else the file's ``_init_weights(module, name)`` function (ConvNeXt:
    trunc-normal std 0.02 convs and linears, zero biases; RegNet, ResNetV2)."""
    where = type(root).__module__
    if not where.startswith("timm."):
        return None
    file = sys.modules.get(where)
    if hasattr(file, "efficientnet_init_weights"):  # EfficientNet, MobileNetV3, ...: TF's fan-out rule per group
        goog = getattr(sys.modules.get("timm.models._efficientnet_builder"), "_init_weight_goog", None)
        if callable(goog):
            return lambda module, path: goog(module, path)
    if hasattr(file, "get_init_weights_vit"):  # Swin and others built on the ViT init (trunc-normal 0.02)
        return lambda module, path: _vit_linear(module)
    fn = getattr(root, "_init_weights", None)  # bound: (module[, name]); else the file's function
    fn = fn if callable(fn) else getattr(file, "_init_weights", None)
    if not callable(fn):
        return None
    params = list(inspect.signature(fn).parameters)
    named = len(params) > 1 and params[1] in ("name", "n")  # MaxxVit, ConvNeXt: the module's path too
    return (lambda module, path: fn(module, path)) if named else (lambda module, path: fn(module))


def _vit_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=TIMM_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _token(p: torch.Tensor, name: str, root: nn.Module) -> None:
    """Class and register tokens normal std 1e-6 (timm's ``VisionTransformer`` and most), trunc-normal std
    0.02 in the families listed in ``TRUNC_TOKENS`` (EVA, BEiT, CaiT, XCiT, ...); DeiT's distillation token
    trunc-normal std 0.02."""
    trunc = name == "dist_token" or any(c.__name__ in TRUNC_TOKENS for c in type(root).__mro__)
    if trunc:
        nn.init.trunc_normal_(p, std=TIMM_STD)
    else:
        nn.init.normal_(p, std=1e-6)


def construction_constant(module: nn.Module, key: str, name: str, undrawn: bool = True) -> float | None:
    """The constant a parameter gets at construction: its value in the run's initial state when constant
    there (:func:`criticality.core.initializers.initial_value`); else, for an ``undrawn`` one, the default of
    the module's constructor argument that sets it; else None (keep the draw; an undrawn one is refused)."""
    start = initial_value(key)
    if start is not None and start.numel() and bool(torch.all(start == start.flatten()[0])):
        return float(start.flatten()[0])
    stem = name.rstrip("0123456789_")
    for arg in CONSTANT_ARGS.get(stem, ()) if undrawn else ():
        param = inspect.signature(type(module).__init__).parameters.get(arg)
        if param is not None and isinstance(param.default, int | float) and not isinstance(param.default, bool):
            return float(param.default)
    return None


def identity_blocks(model: nn.Module, groups: Members) -> list[str]:
    """Groups holding a block whose fresh ``timm`` draw zeroes its last norm (``zero_init_last``)."""
    zeroing = [path for path, m in model.named_modules() if callable(getattr(m, "zero_init_last", None))]
    return [g for g, keys in groups.items()
            if any(k.startswith(f"{p}.") for p in zeroing for k in keys)]


def timm_notes(model: nn.Module, groups: Members) -> dict[str, object]:
    """The groups holding a block whose fresh ``timm`` draw is an identity residual branch, with a note
    saying what that means (for the analysis summary's ``draws``)."""
    same = identity_blocks(model, groups)
    if not same:
        return {}
    return {"identity_blocks": same,
            "note": ("timm's zero_init_last zeroes the last norm of these residual blocks in a fresh draw: "
                     "re-randomizing such a block makes its residual branch the identity (= skipping it)")}


register(DrawScheme("hf", hf_init, is_hf))
register(DrawScheme("timm", timm_init, is_timm, timm_notes))
