"""MONAI ViT -> ViT3D conversion: numerical parity with MONAI itself, checkpoint variants, CLI.

Every MONAI parameter is perturbed away from its initial value (cls_token starts at zeros, LayerNorms
at 1/0), so a weight copied to the wrong place or left unassigned cannot go unnoticed.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from conftest import fresh_python  # noqa: E402

import vit3d  # noqa: E402
from vit3d.convert import CheckpointMismatchError, from_monai, main  # noqa: E402

ATOL = 1e-4
SMALL = {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 4}
CONFIGS = {
    "aniso-features": {"in_channels": 1, "img_size": (32, 32, 16), "patch_size": (8, 8, 4), **SMALL},
    "aniso-cls3-tanh-qkvbias-2ch": {
        "in_channels": 2,
        "img_size": (32, 32, 16),
        "patch_size": (8, 8, 4),
        "classification": True,
        "num_classes": 3,
        "qkv_bias": True,
        **SMALL,
    },
    "cls1-none": {
        "in_channels": 1,
        "img_size": 16,
        "patch_size": 8,
        "classification": True,
        "num_classes": 1,
        "post_activation": None,
        **SMALL,
    },
    "cls3-none-qkvbias-h48": {
        "in_channels": 2,
        "img_size": (16, 16, 32),
        "patch_size": (4, 8, 8),
        "classification": True,
        "num_classes": 3,
        "post_activation": None,
        "qkv_bias": True,
        **{**SMALL, "hidden_size": 48},
    },
    "features-qkvbias-2ch": {"in_channels": 2, "img_size": 16, "patch_size": 4, "qkv_bias": True, **SMALL},
    # MONAI's "perceptron" projection: Rearrange "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" + Linear.
    "perceptron-aniso-cls3-tanh-qkvbias-2ch": {
        "in_channels": 2,
        "img_size": (32, 32, 16),
        "patch_size": (8, 4, 2),
        "proj_type": "perceptron",
        "classification": True,
        "num_classes": 3,
        "qkv_bias": True,
        **SMALL,
    },
    "perceptron-aniso-features": {
        "in_channels": 1,
        "img_size": (16, 32, 16),
        "patch_size": (4, 8, 2),
        "proj_type": "perceptron",
        **SMALL,
    },
    "perceptron-features-qkvbias-2ch": {
        "in_channels": 2,
        "img_size": 16,
        "patch_size": 4,
        "proj_type": "perceptron",
        "qkv_bias": True,
        **SMALL,
    },
}
BASE = CONFIGS["aniso-cls3-tanh-qkvbias-2ch"]


def monai_vit(cfg, seed=0):
    """A MONAI ViT with every parameter moved away from its initial value."""
    torch.manual_seed(seed)
    net = monai_nets.ViT(**cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def volume(model, batch=2, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, *model.volume_shape[1:])).astype("float32")


def monai_forward(net, x):
    """MONAI's (output, final-normed tokens) on channels-last ``x``; tokens via a hook on ``net.norm``."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seen = {}
    handle = net.norm.register_forward_hook(lambda _m, _i, out: seen.update(tokens=out))
    try:
        with torch.no_grad():
            out, _ = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
    finally:
        handle.remove()
    return out.numpy(), seen["tokens"].numpy()


def max_diffs(model, net, x):
    out, tokens = monai_forward(net, x)
    ours = np.asarray(model(x, training=False))
    ours_tokens = np.asarray(model.encode(x, training=False))
    assert ours.shape == out.shape and ours_tokens.shape == tokens.shape
    return float(np.abs(ours - out).max()), float(np.abs(ours_tokens - tokens).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_monai(name):
    cfg = CONFIGS[name]
    net = monai_vit(cfg)
    model = from_monai(net.state_dict(), **cfg)
    assert model.layer_norm_epsilon == 1e-5
    assert model.post_activation == ("tanh" if cfg.get("classification") and "post_activation" not in cfg else None)
    d_out, d_tokens = max_diffs(model, net, volume(model))
    print(f"{name}: max abs diff output {d_out:.3g} tokens {d_tokens:.3g}")
    assert d_out <= ATOL and d_tokens <= ATOL


def test_numpy_state_dict_and_defaults():
    """NumPy values convert too; MONAI's defaults (Tanh head, no qkv bias) apply to absent kwargs."""
    cfg = {"in_channels": 1, "img_size": 16, "patch_size": 8, "classification": True, **SMALL}
    net = monai_vit(cfg, seed=5)
    model = from_monai({k: v.numpy() for k, v in net.state_dict().items()}, **cfg)
    assert model.post_activation == "tanh" and not model.qkv_bias and model.num_classes == 2
    assert max(max_diffs(model, net, volume(model))) <= ATOL


def test_checkpoint_variants_load_identically():
    """Wrapped, DataParallel-prefixed, legacy-named and MONAI >= 1.4 state dicts all give MONAI's outputs."""
    net = monai_vit(BASE, seed=2)
    sd = net.state_dict()
    extra = {f"blocks.{i}.cross_attn.qkv.weight": torch.zeros(96, 32) for i in range(2)}
    extra.update({f"blocks.{i}.norm_cross_attn.weight": torch.ones(32) for i in range(2)})
    legacy = {("patch_embedding.cls_token" if k == "cls_token" else k): v for k, v in sd.items()}
    legacy = {k: v for k, v in legacy.items() if "cross_attn" not in k}  # pre-1.4: no cross-attention keys
    variants = {
        "extra-1.4-keys": {**sd, **extra},
        "legacy": legacy,
        "state_dict+module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
    }
    x = volume(from_monai(sd, **BASE))
    for name, ckpt in variants.items():
        d_out, d_tokens = max_diffs(from_monai(ckpt, **BASE), net, x)
        assert d_out <= ATOL and d_tokens <= ATOL, name


def test_missing_unexpected_and_misshapen_keys_are_named():
    sd = dict(monai_vit(BASE, seed=3).state_dict())
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.linear2.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: blocks\.1\.mlp\.linear2\.bias") as e:
        from_monai(missing, **BASE)
    assert e.value.missing == ["blocks.1.mlp.linear2.bias"] and isinstance(e.value, ValueError)

    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.attn\.extra\.weight"):
        from_monai({**sd, "blocks.0.attn.extra.weight": torch.zeros(3)}, **BASE)

    wrong = {**sd, "blocks.0.mlp.linear1.weight": torch.zeros(65, 32)}
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.linear1\.weight expected \(64, 32\) got \(65, 32\)"):
        from_monai(wrong, **BASE)

    # A Linear+Tanh head (classification_head.0.*) under post_activation=None is a config error, with a hint.
    with pytest.raises(ValueError, match=r"classification_head\.0\.weight.*post_activation='Tanh'"):
        from_monai(sd, **{**BASE, "post_activation": None})
    with pytest.raises(ValueError, match=r"blocks\.1\..*2 blocks, not num_layers=1"):
        from_monai(sd, **{**BASE, "num_layers": 1})


def test_legacy_pos_embed_name_selects_the_perceptron_projection():
    """MONAI < 1.3 called proj_type pos_embed; checkpoints configured that way convert the same."""
    cfg = CONFIGS["perceptron-features-qkvbias-2ch"]
    net = monai_vit(cfg, seed=9)
    legacy = {k: v for k, v in cfg.items() if k != "proj_type"} | {"pos_embed": "perceptron"}
    model = from_monai(net.state_dict(), **legacy)
    assert max(max_diffs(model, net, volume(model))) <= ATOL


def test_projection_type_mismatch_is_named_with_a_hint():
    """A perceptron checkpoint under proj_type='conv' (and the reverse) is refused, saying which to use."""
    perceptron = {**BASE, "proj_type": "perceptron"}
    sd = dict(monai_vit(perceptron, seed=8).state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"patch_embeddings\.1\.weight.*proj_type='perceptron'"):
        from_monai(sd, **BASE)
    conv_sd = dict(monai_vit(BASE, seed=8).state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"proj_type='conv'"):
        from_monai(conv_sd, **perceptron)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("proj_type", "fourier"),
        ("pos_embed", "fourier"),
        ("pos_embed_type", "sincos"),
        ("pos_embed_type", "none"),
        ("spatial_dims", 2),
        ("post_activation", "relu"),
        ("with_cross_attention", True),
    ],
)
def test_unsupported_options_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        from_monai({}, **{**BASE, option: value})


def test_cli_rejects_bad_input_with_exit_2(tmp_path, capsys):
    sd = dict(monai_vit(BASE, seed=4).state_dict())
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BASE))
    ckpt = tmp_path / "missing_key.pt"
    torch.save({k: v for k, v in sd.items() if k != "norm.bias"}, ckpt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad_config = tmp_path / "sincos.json"
    bad_config.write_text(json.dumps({**BASE, "pos_embed_type": "sincos"}))
    out = str(tmp_path / "m.keras")
    cases = [
        ([str(ckpt), str(config)], "norm.bias"),
        ([str(garbage), str(config)], "cannot read checkpoint"),
        ([str(tmp_path / "nope.pt"), str(config)], "no such file"),
        ([str(ckpt), str(bad_config)], "pos_embed_type"),
    ]
    for (ck, cf), needle in cases:
        assert main(["--monai", ck, "--config", cf, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
    assert not (tmp_path / "m.keras").exists()


RELOAD_SCRIPT = """
import json, sys
import vit3d, vit3d.convert
assert "torch" not in sys.modules and "monai" not in sys.modules, "vit3d imported torch or monai"
import numpy as np
x = np.load(sys.argv[1])
result = {}
for path in sys.argv[2:]:
    model = vit3d.load(path)
    result[path] = [np.asarray(model(x, training=False)).tolist(), np.asarray(model.encode(x, training=False)).tolist()]
print(json.dumps(result))
"""


@pytest.mark.slow
def test_cli_and_saved_artifacts_match_monai_in_fresh_processes(tmp_path):
    """`python -m vit3d.convert` end to end, then both artifacts reloaded in a fresh process = MONAI."""
    cfg = {**BASE, "in_channels": 1}  # what jobs.score feeds: one channel
    net = monai_vit(cfg, seed=6)
    sd = net.state_dict()
    api_path = str(tmp_path / "api.keras")
    vit3d.save(from_monai(sd, **cfg), api_path)

    ckpt, config, spec = tmp_path / "vit.pt", tmp_path / "vit.json", tmp_path / "spec.json"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
    config.write_text(json.dumps(cfg))
    spec.write_text(json.dumps({"intensity": {"kind": "clip", "window": [-100, 300]}}))
    cli_path = str(tmp_path / "cli.keras")
    args = ["-m", "vit3d.convert", "--monai", str(ckpt), "--config", str(config), "--out", cli_path]
    run = fresh_python([*args, "--preprocessing", str(spec)])
    assert run.returncode == 0, run.stdout + run.stderr
    info = vit3d.inspect(cli_path)
    assert f"sha256 {info.sha256}" in run.stdout
    assert "parity vs MONAI" in run.stdout and "OK" in run.stdout, run.stdout
    assert info.preprocessing["intensity"] == {"kind": "clip", "window": [-100.0, 300.0]}
    assert info.preprocessing["size"] == [32, 32, 16]

    x = np.random.default_rng(7).normal(size=(2, 32, 32, 16, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    run = fresh_python([str(script), str(tmp_path / "x.npy"), api_path, cli_path])
    assert run.returncode == 0, run.stdout + run.stderr
    outputs = json.loads(run.stdout.strip().splitlines()[-1])
    out, tokens = monai_forward(net, x)
    for path in (api_path, cli_path):
        ours, ours_tokens = (np.asarray(a, dtype=np.float32) for a in outputs[path])
        assert np.abs(ours - out).max() <= ATOL, path
        assert np.abs(ours_tokens - tokens).max() <= ATOL, path
