"""The optlora section of a saved adapter's model card: what the adapter holds and its error, stated.

Written by :mod:`optlora.persist` (``save_pretrained`` of a base-modifying run) next to the error
report :data:`REPORT_FILE` that :func:`optlora.export.write_adapter` writes.
"""

from __future__ import annotations

import os

#: the per-layer error statement written next to every compressed adapter
REPORT_FILE = "optlora_export.json"
#: the exact resume state (optlora.checkpoint.STATE_FILE; named here so that no checkpoint import is needed)
STATE_FILE = "optlora_state.safetensors"
CARD_BEGIN, CARD_END = "<!-- optlora:begin -->", "<!-- optlora:end -->"


def write_card(
    model, directory: str, report, *, method, adapter: str, tol, max_rank, exact_state: bool | str = True
) -> None:
    """State the adapter's error in its model card (``README.md``, PEFT's card plus an optlora section).

    ``exact_state``: ``True`` names the state file written beside the adapter, a string says where the state is instead.
    """
    path = os.path.join(directory, "README.md")
    if not os.path.isfile(path) and hasattr(model, "create_or_update_model_card"):
        model.create_or_update_model_card(directory)
    text = ""
    if os.path.isfile(path):
        with open(path) as fh:
            text = fh.read()
    if CARD_BEGIN in text:
        text = text[: text.index(CARD_BEGIN)] + text[text.index(CARD_END) + len(CARD_END) :]
    worst = max((v["rel_error"] for v in report.layers.values()), default=0.0)
    ranks = [v["rank"] for v in report.layers.values()]
    base = getattr(model.peft_config.get(adapter), "base_model_name_or_path", None) or "the original base model"
    noisy = sum(bool(v.get("above_noise")) for v in report.layers.values())
    noise = (
        f"In {noisy} layer(s) the base weights' dtype cannot hold the update to the tolerance: the merges left "
        "rounding noise in them, which the adapter leaves out (it keeps the part above that noise, "
        "optlora.compress.noise_rank), so most of their stated error is that noise; the trained model stored "
        "in the same dtype has a rounding error of that size too. "
        if noisy
        else ""
    )
    quantized = sum(bool(v.get("quantized_base")) for v in report.layers.values())
    where = (
        f"the same base loaded with the same quantisation ({quantized} layer(s) have quantised weights, which optlora "
        "never changes: their update, which holds ScaLoRA's low-rank residual, is relative to the quantised weights)"
        if quantized
        else "the original base model"
    )
    residual = getattr(method, "residual_rank", None)
    if residual is not None and quantized:
        dropped = method.stats().get("residual_dropped", 0.0)
        noise += (
            f"The run kept the merges of its quantised layers in rank-{residual} residuals, whose truncation cut off "
            f"at most {dropped:.3e} of the merged increments' norm (optlora.residual; the adapter is this trained "
            "model's update, that share is how far the model is from exact ScaLoRA). "
        )
    section = (
        f"{CARD_BEGIN}\n## optlora: accumulated update of a {type(method).__name__} run\n\n"
        f"{type(method).__name__} merges part of each update into the frozen base weights, so this adapter "
        f"holds the whole update `W_now - W_pretrained` for `{base}`, per layer by truncated SVD: "
        f"relative Frobenius error **{report.rel_error:.3e}** over all layers, {worst:.3e} in the worst layer "
        f"(tolerance {tol}; storing the base weights in their dtype alone is off by "
        f"{report.rounding_floor:.3e}; rank cap {max_rank or 'as many numbers as the dense layer'}, ranks "
        f"{min(ranks)}..{max(ranks)}); per layer in "
        f"`{REPORT_FILE}`. {noise}Load it with plain PEFT on {where}."
        + (
            f" `{STATE_FILE}` holds the exact training state for resuming with optlora (method step {method.steps})."
            if exact_state is True
            else f" {exact_state}"
            if exact_state
            else ""
        )
        + f"\n{CARD_END}\n"
    )
    with open(path, "w") as fh:
        fh.write(text.rstrip("\n") + "\n\n" + section)
