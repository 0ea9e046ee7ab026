"""The report a quantized base file carries: per-module errors and bits, rounded so the header size is bounded."""
from __future__ import annotations

from typing import Sequence

# Floats in the file's report are rounded to this many significant digits (bounded header size).
REPORT_DIGITS = 6
# Longest JSON text a rounded float can take ("-1.23457e-100"): the header bound uses it.
WIDEST_FLOAT = -1.23457e-100
# Calibrated bases also report, per module, the importance statistics the widths were chosen by: the output error
# (relative, E[x^2]-weighted), the mean input second moment E[x^2], and the layer's knapsack sensitivity.
CALIBRATED_COLUMNS = ["output_error", "input_ms_mean", "sensitivity"]
# Bases rounded with error feedback also report, per module and in total, the output error on the calibration
# inputs with the full Hessian, ||(W - Q) X||^2 / ||W X||^2, with nearest rounding and with error feedback.
FEEDBACK_COLUMNS = ["output_error_nearest", "output_error_fed"]


def report_round(x: float) -> float:
    return float(f"{x:.{REPORT_DIGITS}g}")


def placeholder_report(shapes: Sequence[tuple[int, int]], weighted: bool, fed: bool) -> dict[str, object]:
    """A report with every number at its longest JSON text: the header bound uses it."""
    rows = sum(o for o, _ in shapes)
    floats = 3 + len(CALIBRATED_COLUMNS) * weighted + len(FEEDBACK_COLUMNS) * fed
    return report_json(
        [[WIDEST_FLOAT] * floats + [o, o, o] for o, _ in shapes],
        {"mse_over_var": WIDEST_FLOAT, "code_bits": WIDEST_FLOAT, "widths": {"1": rows, "2": rows, "4": rows},
         **({"output_error": WIDEST_FLOAT} if weighted else {}),
         **(dict.fromkeys(FEEDBACK_COLUMNS, WIDEST_FLOAT) if fed else {})},
        weighted,
        fed,
    )


def report_json(
    module_rows: list[list[float]], total: dict[str, object], weighted: bool, fed: bool
) -> dict[str, object]:
    columns = ["mse_over_var", "effective_bits", "code_bits"] + (CALIBRATED_COLUMNS if weighted else [])
    columns += FEEDBACK_COLUMNS if fed else []
    return {"columns": columns + ["rows_1bit", "rows_2bit", "rows_4bit"], "modules": module_rows, "total": total}
