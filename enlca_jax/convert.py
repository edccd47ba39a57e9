"""Import of the authors' PyTorch ENLCN weights (``ENLCAx2.pt``, ``ENLCAx4.pt``).

    python -m enlca_jax.convert ENLCAx4.pt --output checkpoints/enlcn_x4_authors

reads a PyTorch state_dict (``.pt``/``.pth``, needs ``pip install torch``) or an ``.npz`` of the
same names, infers the architecture from the shapes, maps every tensor (the frozen random matrices
``body.<i>.attn_fn.projection_matrix`` included) to Flax variables and writes a model checkpoint
(`enlca_jax.checkpointing.save_model`) that ``eval.py`` and `enlca_jax.inference` load directly.

State-dict names (authors' src/model/enlcn.py): ``sub_mean``/``add_mean`` (frozen MeanShift),
``head.0``, ``body.<i>`` (ENLCA: ``conv_match1.0``, ``conv_match2.0``, ``conv_assembly.0``,
``attn_fn.projection_matrix``; ResBlock: ``body.0``, ``body.2``; last index: the body conv),
``tail.0.<2s>`` (upsampler convs, s-th pixel-shuffle stage), ``tail.1`` (last conv).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import zipfile
from typing import Any

import numpy as np

from enlca_jax import attention, models

TORCH_HINT = (
    "Reading a PyTorch .pt/.pth file needs torch, an optional dependency of this converter only: "
    "pip install torch==2.13.0 (CPU is enough). Alternatively save the state_dict as .npz with "
    "numpy in an environment that has torch: np.savez(path, **{k: v.numpy() for k, v in sd.items()})."
)


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a state_dict from ``.pt``/``.pth`` (torch) or ``.npz`` into float32 numpy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}.")
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:
                state = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"cannot read {path}: not a complete .npz file ({error}).") from None
        prefix = "state_dict/"
        if any(key.startswith(prefix) for key in state):  # golden-file layout
            state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        return {key: np.asarray(value, np.float32) for key, value in state.items()}
    try:
        import torch  # noqa: PLC0415  (optional dependency)
    except ImportError as error:
        raise ImportError(TORCH_HINT) from error
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a state_dict (found {type(loaded).__name__}).")
    state = {}
    for key, value in loaded.items():
        key = key.removeprefix("module.").removeprefix("model.")
        state[key] = value.detach().cpu().float().numpy()
    return state


#: The authors' make_model: an ENLCA block first and after every 8th ResBlock, Q/K width n_feats // 4.
AUTHORS_ATTENTION_EVERY = 8
AUTHORS_REDUCTION = 4


def _body_indices(state: dict[str, np.ndarray]) -> dict[int, str]:
    kinds: dict[int, str] = {}
    for key in state:
        match = re.match(r"body\.(\d+)\.(.*)", key)
        if not match:
            continue
        index, rest = int(match.group(1)), match.group(2)
        if rest.startswith(("conv_match1", "conv_match2", "conv_assembly", "attn_fn")):
            kinds[index] = "attention"
        elif rest.startswith("body."):
            kinds[index] = "resblock"
        elif rest in ("weight", "bias"):
            kinds[index] = "conv"
    return dict(sorted(kinds.items()))


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every state_dict entry, in order, with its shape, of the network the authors' ``make_model``
    builds for `infer_config`'s ``config`` (EDSR when ``attention`` is 'none')."""
    f, colors = config["features"], 3
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out, inp, size):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, size, size), (out,)

    conv("sub_mean", colors, colors, 1)
    conv("add_mean", colors, colors, 1)
    conv("head.0", f, colors, 3)
    layout = models.body_layout(config["num_resblocks"], AUTHORS_ATTENTION_EVERY, config.get("attention") != "none")
    for index, (kind, _) in enumerate(layout):
        if kind == "attention":
            embed = f // AUTHORS_REDUCTION
            conv(f"body.{index}.conv_match1.0", embed, f, 1)
            conv(f"body.{index}.conv_match2.0", embed, f, 1)
            conv(f"body.{index}.conv_assembly.0", f, f, 1)
            shapes[f"body.{index}.attn_fn.projection_matrix"] = (config["num_random_features"], embed)
        else:
            conv(f"body.{index}.body.0", f, f, 3)
            conv(f"body.{index}.body.2", f, f, 3)
    conv(f"body.{len(layout)}", f, f, 3)
    for stage, factor in enumerate(models.upsampler_factors(config["scale"])):
        conv(f"tail.0.{2 * stage}", factor * factor * f, f, 3)
    conv("tail.1", colors, f, 3)
    return shapes


def check_state_dict(state: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """Raise ValueError unless ``state`` has exactly `expected_shapes`'s entries, shapes and only
    finite values, naming the first missing, extra, mis-shaped or non-finite entry."""
    expected = expected_shapes(config)
    missing = [key for key in expected if key not in state]
    extra = sorted(key for key in state if key not in expected)
    described = (f"the authors' ENLCN with n_resblocks={config['num_resblocks']}, n_feats={config['features']}, "
                 f"×{config['scale']}" + ("" if config.get("attention") != "none" else ", no attention"))  # fmt: skip
    if missing:
        raise ValueError(f"state_dict lacks {missing[0]!r} (and {len(missing) - 1} more entries) of {described}.")
    if extra:
        raise ValueError(f"state_dict has {extra[0]!r} (and {len(extra) - 1} more entries), not part of {described}.")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(state[key].shape)}, but {described} has {shape} there.")
        if not np.all(np.isfinite(state[key])):
            raise ValueError(f"{key} holds NaN or infinite values: the weights file is damaged.")


def infer_config(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """ENLCN constructor arguments that reproduce the state_dict's architecture.

    The architectures accepted are those of the authors' ``make_model`` (any n_resblocks from 1,
    any n_feats, ×2/×3/×4; an ENLCA block first and after every 8th ResBlock, reduction 4) and the
    same network without attention (EDSR); `check_state_dict` then requires the file to match it
    exactly.

    Returns:
      dict with scale, num_resblocks, features, attention_every, reduction, num_random_features,
      rgb_mean (and attention='none' when the file has no ENLCA blocks); see
      `models.model_from_config`.
    """
    if "head.0.weight" not in state or np.ndim(state["head.0.weight"]) != 4:
        raise ValueError("not an ENLCN/EDSR state_dict: no 'head.0.weight' [n_feats, 3, 3, 3] entry.")
    features = int(state["head.0.weight"].shape[0])
    kinds = _body_indices(state)
    if not kinds:
        raise ValueError("state_dict has no 'body.<i>' entries.")
    num_resblocks = sum(kind == "resblock" for kind in kinds.values())
    config: dict[str, Any] = {"features": features, "num_resblocks": num_resblocks}
    if "attention" in kinds.values():
        config["attention_every"] = AUTHORS_ATTENTION_EVERY
        config["reduction"] = AUTHORS_REDUCTION
        first = next(i for i, kind in kinds.items() if kind == "attention")
        projection = state.get(f"body.{first}.attn_fn.projection_matrix")
        if projection is None or np.ndim(projection) != 2:
            raise ValueError(f"state_dict lacks 'body.{first}.attn_fn.projection_matrix' [m, n_feats // 4].")
        config["num_random_features"] = int(projection.shape[0])
    else:
        config["attention"] = "none"
    stages = sorted(int(m.group(1)) for k in state if (m := re.match(r"tail\.0\.(\d+)\.weight", k)))
    first_out = state["tail.0.0.weight"].shape[0] if "tail.0.0.weight" in state else None
    if stages == [0, 2] and first_out == 4 * features:
        config["scale"] = 4
    elif stages == [0] and first_out == 4 * features:
        config["scale"] = 2
    elif stages == [0] and first_out == 9 * features:
        config["scale"] = 3
    else:
        raise ValueError(
            f"cannot infer the scale from the upsampler convs tail.0.{stages} with {first_out} outputs: expected "
            f"tail.0.0 with {4 * features} (×2) or {9 * features} (×3) outputs, or tail.0.0 and tail.0.2 (×4)."
        )
    check_state_dict(state, config)
    # float32 in the file; the constants have 4 decimals, so rounding recovers them exactly.
    config["rgb_mean"] = tuple(round(float(v), 6) for v in -state["sub_mean.bias"])
    return config


def _conv(state: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    try:
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
    except KeyError as error:
        raise ValueError(f"state_dict lacks {error.args[0]!r}.") from None
    return {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}  # OIHW → HWIO


def convert_state_dict(state: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map an authors' state_dict to ``(model_config, variables)`` for `models.ENLCN`."""
    config = infer_config(state)
    params: dict[str, Any] = {"head": _conv(state, "head.0")}
    features: dict[str, Any] = {}
    kinds = _body_indices(state)
    attention_index = resblock_index = 0
    for index, kind in kinds.items():
        if kind == "attention":
            name = f"attention_{attention_index}"
            params[name] = {
                "query": _conv(state, f"body.{index}.conv_match1.0"),
                "key": _conv(state, f"body.{index}.conv_match2.0"),
                "value": _conv(state, f"body.{index}.conv_assembly.0"),
            }
            features[name] = {"projection": state[f"body.{index}.attn_fn.projection_matrix"]}
            attention_index += 1
        elif kind == "resblock":
            params[f"resblocks_{resblock_index}"] = {
                "conv1": _conv(state, f"body.{index}.body.0"),
                "conv2": _conv(state, f"body.{index}.body.2"),
            }
            resblock_index += 1
        else:
            params["body_conv"] = _conv(state, f"body.{index}")
    params["upsampler"] = {
        f"conv_{s}": _conv(state, f"tail.0.{2 * s}") for s in range(len(models.upsampler_factors(config["scale"])))
    }
    params["tail"] = _conv(state, "tail.1")
    variables = {"params": params}
    if features:
        variables[attention.FEATURE_COLLECTION] = features
    _check_against_model(config, variables)
    return config, variables


def _check_against_model(config: dict[str, Any], variables: dict[str, Any]) -> None:
    import jax  # noqa: PLC0415

    model = models.model_from_config(config)
    expected = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    got = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(got):
        raise ValueError("converted variables do not match the inferred ENLCN structure.")
    for (path, want), have in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(got), strict=True
    ):
        if want.shape != have.shape:
            raise ValueError(f"{jax.tree_util.keystr(path)}: expected {want.shape}, got {have.shape}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enlca_jax.convert",
        description="Convert the authors' ENLCN PyTorch weights (.pt/.pth or .npz state_dict) to an "
        "enlca_jax model checkpoint that eval.py and enlca_jax.inference load.",
    )
    parser.add_argument("weights", help="ENLCAx2.pt / ENLCAx4.pt, or an .npz with the same names")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    args = parser.parse_args(argv)
    from enlca_jax import checkpointing  # noqa: PLC0415  (imports orbax only when needed)

    try:
        state = load_state_dict(args.weights)
        config, variables = convert_state_dict(state)
        checkpointing.save_model(args.output, config, variables, overwrite=args.force)
    except (ImportError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    params = models.count_params(variables["params"])
    print(f"wrote {args.output}: ENLCN {config} with {params:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
