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
        with np.load(path) as data:
            state = {key: data[key] for key in data.files}
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


def infer_config(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """ENLCN constructor arguments that reproduce the state_dict's architecture.

    Returns:
      dict with scale, num_resblocks, features, attention_every, reduction, num_random_features,
      rgb_mean (and attention='none' when the file has no ENLCA blocks); see
      `models.model_from_config`.
    """
    if "head.0.weight" not in state:
        raise ValueError("not an ENLCN/EDSR state_dict: no 'head.0.weight' entry.")
    features = state["head.0.weight"].shape[0]
    kinds = _body_indices(state)
    if not kinds or list(kinds.values())[-1] != "conv":
        raise ValueError("state_dict has no final body conv 'body.<last>.weight'.")
    order = list(kinds.values())[:-1]
    num_resblocks = order.count("resblock")
    config: dict[str, Any] = {"features": int(features), "num_resblocks": num_resblocks}
    if "attention" in order:
        gaps = [i for i, kind in enumerate(order) if kind == "attention"]
        attention_every = gaps[1] - gaps[0] - 1 if len(gaps) > 1 else max(num_resblocks, 1)
        config["attention_every"] = attention_every
        first = next(i for i, kind in kinds.items() if kind == "attention")
        projection = state[f"body.{first}.attn_fn.projection_matrix"]
        config["num_random_features"] = int(projection.shape[0])
        config["reduction"] = int(features // projection.shape[1])
    else:
        config["attention"] = "none"
    stages = sorted(int(m.group(1)) for k in state if (m := re.match(r"tail\.0\.(\d+)\.weight", k)))
    first_out = state["tail.0.0.weight"].shape[0]
    if len(stages) == 2 and first_out == 4 * features:
        config["scale"] = 4
    elif len(stages) == 1 and first_out == 4 * features:
        config["scale"] = 2
    elif len(stages) == 1 and first_out == 9 * features:
        config["scale"] = 3
    else:
        raise ValueError(f"cannot infer the scale from the tail convs {stages} with {first_out} outputs.")
    if "sub_mean.bias" in state:
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
