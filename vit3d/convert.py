"""Convert a MONAI ``monai.networks.nets.ViT`` checkpoint into a verified :class:`vit3d.ViT3D`.

``from_monai(state_dict, **monai_kwargs)`` takes the state dict and the very keyword arguments that
built the MONAI model, so the architecture is never guessed from tensor shapes: a checkpoint that does
not fit the configuration is refused, naming the keys, rather than half-loaded.

CLI (needs torch; monai is only used, when installed, for the parity line)::

    python -m vit3d.convert --monai CKPT.pt --config monai_kwargs.json --out model.keras [--preprocessing spec.json]

Neither torch nor monai is imported when this module is imported: state dict values may be torch
tensors or NumPy arrays, and torch is loaded only by the CLI to read the checkpoint file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vit3d.model import ViT3D

# MONAI ViT's keyword arguments and their defaults (monai.networks.nets.ViT, MONAI 1.x).
MONAI_DEFAULTS = {
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "proj_type": "conv",
    "pos_embed_type": "learnable",
    "classification": False,
    "num_classes": 2,
    "dropout_rate": 0.0,
    "spatial_dims": 3,
    "post_activation": "Tanh",
    "qkv_bias": False,
    "save_attn": False,
}
REQUIRED = ("in_channels", "img_size", "patch_size")
# MONAI's patch projections: a strided Conv3d, or Rearrange + Linear ("perceptron"). Both are the same linear
# map of each patch with other weight layouts; ViT3D computes either as patchify + one matmul.
PROJ_TYPES = ("conv", "perceptron")
# Arguments that change no weight and no inference output: accepted and dropped.
HARMLESS = {"save_attn"}
MONAI_LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default; Keras's own default is 1e-3
PARITY_ATOL = 1e-4

# Keys MONAI >= 1.4 creates but never uses when with_cross_attention=False (ViT never sets it).
_IGNORED = re.compile(r"^blocks\.\d+\.(cross_attn|norm_cross_attn)\.")
# Older MONAI names -> current names.
_LEGACY = {"patch_embedding.cls_token": "cls_token"}
_WRAPPERS = ("state_dict", "model", "module", "net", "network")
_ANCHORS = (
    "patch_embedding.position_embeddings",
    "patch_embedding.patch_embeddings.weight",
    "patch_embedding.patch_embeddings.1.weight",
)


class CheckpointMismatchError(ValueError):
    """The state dict does not fit the configuration; ``missing``, ``unexpected``, ``mismatched`` say how."""

    def __init__(
        self,
        message: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def _names(keys, limit=25):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def vit3d_kwargs(**monai_kwargs: Any) -> dict[str, Any]:
    """The ViT3D constructor arguments equivalent to MONAI ``ViT(**monai_kwargs)``.

    MONAI's defaults fill absent arguments (they differ from ViT3D's: post_activation "Tanh",
    LayerNorm eps 1e-5). Options ViT3D cannot reproduce raise ValueError naming the option,
    because a silently different model would be worse than none.
    """
    missing = [k for k in REQUIRED if k not in monai_kwargs]
    if missing:
        raise ValueError(f"MONAI ViT arguments {missing} are required (MONAI has no default for them)")
    cfg = {**MONAI_DEFAULTS, **monai_kwargs}
    if "pos_embed" in cfg:  # MONAI < 1.3 name of proj_type
        legacy = cfg.pop("pos_embed")
        if "proj_type" in monai_kwargs and monai_kwargs["proj_type"] != legacy:
            raise ValueError(
                f"pos_embed={legacy!r} (legacy name of proj_type) contradicts proj_type={cfg['proj_type']!r}"
            )
        cfg["proj_type"] = legacy
    proj_name = "proj_type" if "pos_embed" not in monai_kwargs else "pos_embed"
    known = set(MONAI_DEFAULTS) | set(REQUIRED) | HARMLESS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unsupported MONAI ViT option(s) {unknown}: ViT3D cannot reproduce them")
    if cfg["spatial_dims"] != 3:
        raise ValueError(f"unsupported spatial_dims={cfg['spatial_dims']!r}: ViT3D is 3-D only")
    proj_type = str(cfg["proj_type"]).lower()
    if proj_type not in PROJ_TYPES:
        raise ValueError(
            f"unsupported {proj_name}={cfg['proj_type']!r}: patch embedding (proj_type) must be one of {PROJ_TYPES}"
        )
    if str(cfg["pos_embed_type"]).lower() != "learnable":
        raise ValueError(
            f"unsupported pos_embed_type={cfg['pos_embed_type']!r}: only 'learnable' position embeddings are supported"
        )
    post = cfg["post_activation"]
    # MONAI adds Tanh only for exactly "Tanh"; any other string silently means no activation there,
    # which is almost always a typo, so refuse it instead of guessing.
    if post == "Tanh":
        post = "tanh"
    elif post is None or post == "":
        post = None
    else:
        raise ValueError(f"unsupported post_activation={post!r}: MONAI ViT supports 'Tanh' or None")
    for name in ("img_size", "patch_size"):
        value = cfg[name]
        if not isinstance(value, int) and len(value) != 3:
            raise ValueError(f"{name}={value!r} must be an int or 3 ints for a 3-D ViT")
    return {
        "img_size": cfg["img_size"],
        "patch_size": cfg["patch_size"],
        "in_channels": int(cfg["in_channels"]),
        "hidden_size": int(cfg["hidden_size"]),
        "mlp_dim": int(cfg["mlp_dim"]),
        "num_layers": int(cfg["num_layers"]),
        "num_heads": int(cfg["num_heads"]),
        "classification": bool(cfg["classification"]),
        "num_classes": int(cfg["num_classes"]),
        "dropout_rate": float(cfg["dropout_rate"]),
        "qkv_bias": bool(cfg["qkv_bias"]),
        "layer_norm_epsilon": MONAI_LAYER_NORM_EPSILON,
        # Without a head there is nothing to activate; keep the config honest.
        "post_activation": post if cfg["classification"] else None,
    }


def _to_numpy(value):
    """A float32 array from a torch tensor (any device, bf16/fp16 included) or anything array-like."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if getattr(value, "is_floating_point", lambda: False)():
            value = value.float()  # bfloat16 has no NumPy dtype
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def _is_tensor_map(obj):
    return isinstance(obj, dict) and any(hasattr(v, "shape") for v in obj.values())


def normalize_state_dict(checkpoint: Any) -> tuple[dict[str, Any], list[str]]:
    """The bare MONAI-named state dict inside ``checkpoint`` and notes on what was done to it.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers, strips a prefix such as
    ``module.`` (DataParallel) found in front of the patch-embedding keys, renames legacy keys and
    drops MONAI >= 1.4's unused cross-attention keys. Keys outside the prefix are kept as they are,
    so they are reported as unexpected rather than silently discarded.
    """
    notes = []
    sd = checkpoint
    while isinstance(sd, dict) and not _is_tensor_map(sd):
        inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        notes.append(f"unwrapped {next(k for k in _WRAPPERS if sd.get(k) is inner)!r}")
        sd = inner
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"not a state dict: got {'an empty ' if not sd else ''}{type(sd).__name__}")
    sd = {str(k): v for k, v in sd.items()}

    prefix = ""
    for key in sd:
        for anchor in _ANCHORS:
            if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith(".")):
                prefix = key[: -len(anchor)]
                break
        else:
            continue
        break
    if prefix:
        sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
        notes.append(f"stripped prefix {prefix!r}")

    out, ignored = {}, 0
    for key, value in sd.items():
        if _IGNORED.match(key):
            ignored += 1
            continue
        new = _LEGACY.get(key, key)
        if new in out or (new != key and new in sd):
            raise CheckpointMismatchError(f"checkpoint holds both {key} and {new}", unexpected=[key])
        if new != key:
            notes.append(f"renamed legacy {key} -> {new}")
        out[new] = value
    if ignored:
        notes.append(f"ignored {ignored} unused cross-attention tensors")
    return out, notes


def projection_type(monai_kwargs: Mapping[str, Any]) -> str:
    """MONAI's patch projection for ``monai_kwargs``: "conv" or "perceptron" (validated by vit3d_kwargs)."""
    value = monai_kwargs.get("proj_type", monai_kwargs.get("pos_embed", MONAI_DEFAULTS["proj_type"]))
    return str(value).lower()


def projection_key(proj_type: str) -> str:
    """The state-dict prefix of MONAI's patch projection: a Conv3d, or the Linear after Rearrange."""
    return "patch_embedding.patch_embeddings." + ("1." if proj_type == "perceptron" else "")


def expected_shapes(cfg: Mapping[str, Any], proj_type: str = "conv") -> dict[str, tuple[int, ...]]:
    """MONAI's state-dict keys and their (torch-layout) shapes for the ViT3D arguments ``cfg``."""
    from vit3d.layers import as_triple, grid_shape

    hidden, mlp, c = cfg["hidden_size"], cfg["mlp_dim"], cfg["in_channels"]
    grid = grid_shape(cfg["img_size"], cfg["patch_size"])
    patch = as_triple(cfg["patch_size"], "patch_size")
    projection = projection_key(proj_type)
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.position_embeddings": (1, grid[0] * grid[1] * grid[2], hidden),
        projection + "weight": (hidden, c, *patch) if proj_type == "conv" else (hidden, c * int(np.prod(patch))),
        projection + "bias": (hidden,),
        "norm.weight": (hidden,),
        "norm.bias": (hidden,),
    }
    for i in range(cfg["num_layers"]):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (hidden,),
                b + "norm1.bias": (hidden,),
                b + "attn.qkv.weight": (3 * hidden, hidden),
                b + "attn.out_proj.weight": (hidden, hidden),
                b + "attn.out_proj.bias": (hidden,),
                b + "norm2.weight": (hidden,),
                b + "norm2.bias": (hidden,),
                b + "mlp.linear1.weight": (mlp, hidden),
                b + "mlp.linear1.bias": (mlp,),
                b + "mlp.linear2.weight": (hidden, mlp),
                b + "mlp.linear2.bias": (hidden,),
            }
        )
        if cfg["qkv_bias"]:
            shapes[b + "attn.qkv.bias"] = (3 * hidden,)
    if cfg["classification"]:
        shapes["cls_token"] = (1, 1, hidden)
        head = "classification_head.0." if cfg["post_activation"] == "tanh" else "classification_head."
        shapes[head + "weight"] = (cfg["num_classes"], hidden)
        shapes[head + "bias"] = (cfg["num_classes"],)
    return shapes


def _mismatch_hints(cfg, missing, unexpected):
    """Say which argument probably differs, since a list of 50 key names rarely does."""
    hints = []
    if any(k.startswith("patch_embedding.patch_embeddings.1.") for k in unexpected):
        hints.append("patch_embeddings.1.* is MONAI's perceptron projection: proj_type='perceptron'?")
    elif any(k.startswith("patch_embedding.patch_embeddings.") and ".1." not in k for k in unexpected):
        hints.append("a bare patch_embeddings.* is MONAI's conv projection: proj_type='conv'?")

    def block(key):
        m = re.match(r"blocks\.(\d+)\.", key)
        return int(m.group(1)) if m else None

    extra_blocks = {block(k) for k in unexpected if block(k) is not None and block(k) >= cfg["num_layers"]}
    if extra_blocks:
        hints.append(f"the checkpoint has {max(extra_blocks) + 1} blocks, not num_layers={cfg['num_layers']}?")
    if any(k.endswith("attn.qkv.bias") for k in missing):
        hints.append("the checkpoint has no qkv bias: qkv_bias=False?")
    if any(k.endswith("attn.qkv.bias") and block(k) < cfg["num_layers"] for k in unexpected):
        hints.append("the checkpoint has a qkv bias: qkv_bias=True?")
    head = any(k.startswith("classification_head.") for k in unexpected)
    if (head or "cls_token" in unexpected) and not cfg["classification"]:
        hints.append("the checkpoint has a classification head: classification=True?")
    elif any(k.startswith("classification_head.0.") for k in unexpected):
        hints.append("classification_head.0.* is MONAI's Linear+Tanh head: post_activation='Tanh'?")
    elif head:
        hints.append("a bare classification_head.* is MONAI's head without Tanh: post_activation=None?")
    return hints


def _shape(value):
    shape = getattr(value, "shape", None)
    return tuple(int(n) for n in (shape if shape is not None else np.shape(value)))


def check_state_dict(state_dict: Mapping[str, Any], cfg: Mapping[str, Any], proj_type: str = "conv") -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and wrongly shaped key."""
    shapes = expected_shapes(cfg, proj_type)
    missing, unexpected = set(shapes) - set(state_dict), set(state_dict) - set(shapes)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        hints = _mismatch_hints(cfg, missing, unexpected)
        raise CheckpointMismatchError(
            "checkpoint does not fit the MONAI ViT config: " + "; ".join(parts + hints),
            missing=sorted(missing),
            unexpected=sorted(unexpected),
        )
    mismatched = [(k, shapes[k], _shape(state_dict[k])) for k in shapes if _shape(state_dict[k]) != shapes[k]]
    if mismatched:
        raise CheckpointMismatchError(
            "shape mismatch: " + "; ".join(f"{k} expected {e} got {a}" for k, e, a in mismatched),
            mismatched=mismatched,
        )


def from_monai(state_dict: Any, **monai_kwargs: Any) -> ViT3D:
    """A built :class:`vit3d.ViT3D` holding the weights of MONAI ``ViT(**monai_kwargs)``'s ``state_dict``.

    ``state_dict`` may be wrapped (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` keys)
    and hold torch tensors or NumPy arrays. Raises ValueError for unsupported options and
    :class:`CheckpointMismatchError` (a ValueError) naming missing, unexpected or misshapen keys.
    """
    from vit3d.model import ViT3D

    cfg = vit3d_kwargs(**monai_kwargs)
    proj_type = projection_type(monai_kwargs)
    sd, _ = normalize_state_dict(state_dict)
    check_state_dict(sd, cfg, proj_type)
    arrays = {k: _to_numpy(v) for k, v in sd.items()}
    bad = sorted(k for k, a in arrays.items() if not np.all(np.isfinite(a)))
    if bad:
        raise ValueError(f"checkpoint holds NaN or infinite values in {_names(bad)}")

    model = ViT3D(**cfg)
    model.build(model.volume_shape)
    pe = model.patch_embedding
    projection = projection_key(proj_type)
    weight = arrays[projection + "weight"]
    if proj_type == "conv":  # Conv3d (out, in, kD, kH, kW) -> kernel (kD, kH, kW, in, out)
        kernel = weight.transpose(2, 3, 4, 1, 0)
    else:  # Linear (out, pD·pH·pW·in), inputs flattened as (p1 p2 p3 c) -> the same kernel, reshaped
        kernel = weight.T.reshape(tuple(pe.projection.kernel.shape))
    # Tokens are row-major (D', H', W') in both MONAI projections, so the position embeddings copy as they are.
    pairs = [
        (pe.projection.kernel, kernel),
        (pe.projection.bias, arrays[projection + "bias"]),
        (pe.position_embeddings, arrays["patch_embedding.position_embeddings"]),
        (model.norm.gamma, arrays["norm.weight"]),
        (model.norm.beta, arrays["norm.bias"]),
    ]

    def linear(dense: Any, key: str) -> None:  # torch Linear weight (out, in) -> Dense kernel (in, out)
        pairs.append((dense.kernel, arrays[key + ".weight"].T))
        if dense.use_bias:
            pairs.append((dense.bias, arrays[key + ".bias"]))

    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}."
        pairs += [
            (block.norm1.gamma, arrays[b + "norm1.weight"]),
            (block.norm1.beta, arrays[b + "norm1.bias"]),
            (block.norm2.gamma, arrays[b + "norm2.weight"]),
            (block.norm2.beta, arrays[b + "norm2.bias"]),
        ]
        linear(block.attn.qkv, b + "attn.qkv")  # same [q | k | v], head-major layout as MONAI
        linear(block.attn.out_proj, b + "attn.out_proj")
        linear(block.mlp.linear1, b + "mlp.linear1")
        linear(block.mlp.linear2, b + "mlp.linear2")
    if model.classification:
        pairs.append((model.cls_token, arrays["cls_token"]))
        linear(model.head, "classification_head.0" if model.post_activation == "tanh" else "classification_head")

    assigned = {id(v) for v, _ in pairs}
    left = [v.path for v in model.weights if id(v) not in assigned]
    if left or len(pairs) != len(model.weights):
        raise RuntimeError(f"converter bug: ViT3D weights not assigned: {left}")
    for variable, value in pairs:
        if tuple(variable.shape) != value.shape:
            raise RuntimeError(f"converter bug: {variable.path} is {tuple(variable.shape)}, value {value.shape}")
        variable.assign(value)
    return model


# --- parity against MONAI itself (optional: only when monai is installed) ---------------------------


def monai_parity(
    model: ViT3D, state_dict: Any, monai_kwargs: Mapping[str, Any], x: np.ndarray
) -> dict[str, float] | None:
    """Max abs differences between ``model`` and MONAI's own ViT on ``x`` (NDHWC), TF32 off.

    Returns {"output": d, "tokens": d}, or None when monai is not installed. Tokens are the
    final-normed tokens, taken from a hook on MONAI's ``norm`` so classifiers are compared too.
    """
    try:
        import torch
        from monai.networks.nets import ViT
    except ImportError:
        return None
    from vit3d.artifact import without_tf32

    kwargs = dict(monai_kwargs)
    if "pos_embed" in kwargs:
        kwargs.setdefault("proj_type", kwargs.pop("pos_embed"))
    sd, _ = normalize_state_dict(state_dict)
    net = ViT(**kwargs).eval()
    result = net.load_state_dict({k: torch.as_tensor(_to_numpy(v)) for k, v in sd.items()}, strict=False)
    leftover = [k for k in result.missing_keys if not _IGNORED.match(k)] + list(result.unexpected_keys)
    if leftover:
        raise CheckpointMismatchError(f"MONAI's ViT itself does not accept the checkpoint: {_names(leftover)}")
    captured: dict[str, Any] = {}
    handle = net.norm.register_forward_hook(lambda _m, _i, out: captured.update(tokens=out))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            out, _ = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def run() -> tuple[np.ndarray, np.ndarray]:
        import keras

        return (
            keras.ops.convert_to_numpy(model(x, training=False)),
            keras.ops.convert_to_numpy(model.encode(x, training=False)),
        )

    ours, tokens = without_tf32(run)
    return {
        "output": float(np.max(np.abs(ours - out.numpy()))),
        "tokens": float(np.max(np.abs(tokens - captured["tokens"].numpy()))),
    }


# --- CLI ---------------------------------------------------------------------------------------------


class _BadInput(Exception):
    """Input the user must fix: exit code 2 with a one-line message."""


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise _BadInput(f"cannot read {what} {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise _BadInput(f"{what} {path} is not valid JSON: {e}") from e


def _load_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint is data, never code to run."""
    try:
        import torch
    except ImportError as e:
        raise _BadInput("reading a .pt checkpoint needs torch: pip install 'vit3d-batch[monai]'") from e
    if not os.path.isfile(path):
        raise _BadInput(f"cannot read checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", _one_line(e))
        reason = (
            f"not a plain weights checkpoint (torch.load weights_only=True refused it: {detail.group(1)})"
            if detail
            else f"{type(e).__name__}: {_one_line(e)[:300]}"
        )
        raise _BadInput(f"cannot read checkpoint {path}: {reason}") from e


def _one_line(text):
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, check parity against MONAI (when installed), save with vit3d.save and reload to verify."""
    parser = argparse.ArgumentParser(prog="python -m vit3d.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--monai", required=True, metavar="CKPT.pt", help="torch.save'd MONAI ViT state dict")
    parser.add_argument("--config", required=True, metavar="JSON", help="keyword arguments that built the MONAI ViT")
    parser.add_argument("--out", required=True, metavar="PATH", help="artifact to write: .keras path or s3:// URI")
    parser.add_argument("--preprocessing", metavar="JSON", help="preprocessing spec to store in the artifact")
    args = parser.parse_args(argv)

    try:
        if not args.out.endswith(".keras"):
            raise _BadInput(f"--out {args.out}: a vit3d artifact's name must end in .keras")
        config = _read_json(args.config, "config")
        if not isinstance(config, dict):
            raise _BadInput(f"config {args.config} must be a JSON object of MONAI ViT keyword arguments")
        spec = _read_json(args.preprocessing, "preprocessing spec") if args.preprocessing else None
        if spec is not None:
            from vit3d.preprocessing import normalize_spec

            normalize_spec(spec)
        state_dict, notes = normalize_state_dict(_load_checkpoint(args.monai))
        model = from_monai(state_dict, **config)  # normalizing again inside is a no-op
    except (_BadInput, ValueError, TypeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2

    import vit3d
    from vit3d.artifact import probe_input

    print(f"converted {args.monai}: {len(model.weights)} weights" + (f" ({'; '.join(notes)})" if notes else ""))
    x = probe_input((1, *model.volume_shape[1:]))
    try:
        parity: dict[str, float] | str | None = monai_parity(model, state_dict, config, x)
    except CheckpointMismatchError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as e:  # an older MONAI that cannot build this config
        parity = f"the installed MONAI cannot build this config: {_one_line(e)}"
    if parity is None or isinstance(parity, str):
        print(f"parity: skipped ({parity or 'monai is not installed'})")
    else:
        worst = max(parity.values())
        print(
            f"parity vs MONAI: max abs diff {parity['output']:.3g} (output), {parity['tokens']:.3g} (tokens), "
            f"tolerance {PARITY_ATOL:g}: {'OK' if worst <= PARITY_ATOL else 'FAILED'}"
        )
        if not worst <= PARITY_ATOL:
            print("error: the converted model does not reproduce MONAI's outputs; nothing written", file=sys.stderr)
            return 1
    if model.classification and model.post_activation == "tanh":
        print("note: post_activation='Tanh' -> outputs are tanh(logits) in (-1, 1), as MONAI's", file=sys.stderr)
    try:
        vit3d.save(model, args.out, preprocessing=spec)
        _, info = vit3d.load_with_info(args.out)
    except (vit3d.ArtifactError, OSError, ValueError) as e:
        print(f"error: writing {args.out} failed: {_one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {info.path} sha256 {info.sha256} ({info.size_bytes} bytes), reloaded and verified by vit3d.load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
