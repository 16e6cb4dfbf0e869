"""GPTQ and AWQ through GPTQModel (``recipe=quantize method.scheme=gptq | awq``): calibrated 4-bit
(or 2 / 3 / 8-bit GPTQ) weights in the checkpoint format vLLM, SGLang and transformers read.

    polmctl run recipe=quantize method.scheme=gptq                     # 4-bit, groups of 64
    polmctl run recipe=quantize method.scheme=gptq method.bits=8 method.group_size=128
    polmctl run recipe=quantize method.scheme=awq model.name_or_path=outputs/sft/...  # an SFT run's model
    polmctl run recipe=quantize method.scheme=gptq data=instructions   # calibrate on other rows

GPTQ (Frantar et al., 2022) rounds each weight column by column and spreads the rounding error over
the columns not yet rounded through the inverse Hessian ``X^T X`` of the layer's calibration inputs.
AWQ (Lin et al., 2023) scales up the input channels that carry large activations before rounding
and folds the inverse scale into the previous op. Both need calibration rows: the first
``method.calibration_rows`` rows of the run's data (prompt and answer), layer by layer in the order
the model runs them. GPTQModel does the work (polmctl writes neither algorithm by hand); it saves
with its own ``save``, which ``polmctl.models.save_model`` calls for its wrapper (models/save.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from polmctl.compress.quantize import _first_line


@contextlib.contextmanager
def _gptqmodel_output():
    """GPTQModel prints a banner at import and a line per layer and kernel choice to stdout; they
    would break polmctl's own status line, so they go to a buffer. Errors still raise."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _cpu_workers() -> None:
    # GPTQModel sizes its CPU thread pool at half the cores and then asks for 2 loader threads out of
    # it, which fails on a 2-core machine ("requests 2 workers but parent 'cpu' only has 1");
    # GPTQMODEL_CPU_WORKERS is its documented override.
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, ((os.cpu_count() or 1) + 1) // 2))


def quantize_config(method):
    """GPTQModel's config for ``method``: GPTQ (v1 checkpoint format, the one transformers' GPTQConfig
    and vLLM load) or AWQ (GEMM format), ``method.bits`` in groups of ``method.group_size``; kept in
    memory rather than offloaded to a temporary dir, as the source model already is."""
    from gptqmodel import QuantizeConfig

    fmt = {"gptq": "gptq", "awq": "gemm"}[method.scheme]
    return QuantizeConfig(
        bits=method.bits, group_size=method.group_size, method=method.scheme, format=fmt, offload_to_disk=False
    )


def quantize_calibrated(
    source: str | Path, method, calibration: list[list[int]], *, device, dtype, trust_remote_code, work_dir=None
):
    """GPTQModel's wrapper of the causal LM in the full-precision model dir ``source``, its decoder
    Linear layers quantized by ``method`` on ``calibration`` (token id lists). GPTQModel writes a log
    per layer pass (each module's loss, samples, time) into ``logs/`` of the working directory; it runs
    in ``work_dir`` (the run dir: <run dir>/logs/), or a temporary dir that is removed, never the
    user's own working directory."""
    from polmctl.errors import ConfigError

    if not calibration:
        raise ConfigError(
            "method.calibration_rows", f"{method.scheme} needs calibration rows; the run's data gave none"
        )
    _cpu_workers()
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
    source = Path(source).resolve()  # before the chdir below
    with contextlib.ExitStack() as stack:
        where = work_dir if work_dir is not None else stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(contextlib.chdir(where))  # GPTQModel's logs/ is relative to the working directory
        return _quantize(source, method, rows, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _quantize(source: Path, method, rows: list[dict], *, device, dtype, trust_remote_code):
    from polmctl.errors import ModelError

    with _gptqmodel_output():
        from gptqmodel import GPTQModel

        try:
            model = GPTQModel.load(
                str(source),
                quantize_config(method),
                device=str(device),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
        except (OSError, ValueError, TypeError, NotImplementedError) as err:  # e.g. an architecture it lacks
            raise ModelError(f"GPTQModel cannot load {source} for {method.scheme}: {_first_line(err)}") from None
        if method.scheme == "awq":
            _check_awq_shapes(model.model, source)
        try:
            # calibration_data_min_length=1: polmctl chose the rows; GPTQModel's default drops those
            # under 10 tokens, which would silently shrink short-answer data.
            model.quantize(rows, batch_size=method.calibration_batch_size, calibration_data_min_length=1)
        except (ValueError, AssertionError, NotImplementedError, RuntimeError) as err:
            raise ModelError(
                f"GPTQModel could not quantize {source} with method.scheme={method.scheme} "
                f"(bits {method.bits}, group_size {method.group_size}): {_first_line(err)}"
            ) from None
    model.eval()
    return model


# GPTQModel's AWQ clip search takes a layer's output rows in batches of 64 (or 256) and asserts they divide
AWQ_ROWS = 64


def _check_awq_shapes(model, source) -> None:
    from polmctl.compress.prune import prunable_linears
    from polmctl.errors import ModelError

    odd = [f"{n} ({m.out_features})" for n, m in prunable_linears(model).items() if m.out_features % AWQ_ROWS]
    if odd:
        raise ModelError(
            f"AWQ needs every decoder Linear's output width to be a multiple of {AWQ_ROWS}; {source} has "
            f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}: use method.scheme=gptq"
        )
