"""LowRA base quantization: learned per-row codebooks, mixed 1/2/4-bit rows under a whole-file bit budget.

Method (LowRA, arXiv 2502.08141, sections 4.1-4.2; numbers measured in bench/bench_base_quantization.py):
1. **Normalize** (optional, ``group_size > 0``). Each row is cut into groups of ``group_size`` inputs (the last
   may be partial) divided by their absmax, rounded to float16 first so that decode multiplies by exactly what
   we divided by; a group of zeros gets scale 0 and decodes to 0. The paper (after QLoRA) uses 64-groups; on
   SmolLM2 no groups is better at every budget measured once the scales' bits are counted (see
   DEFAULT_GROUP_SIZE), so by default each row's codebook carries its scale itself.
2. **Map.** Every row learns its own codebook at each width 1, 2 and 4 with weighted Lloyd-Max
   (:func:`lowra.sdk.quant.codebook.lloyd_max`) on its normalized values. Element weights are ``scale**2`` (times the input
   second moment ``E[x^2]`` of the feature when input statistics are used), so the codebook minimizes the error
   in *weight space* (or the expected output error), not in the normalized space (measured -1..-4% SSE).
   Lloyd-Max runs on a 128-bin weighted histogram of each row (uniform bins over the row's range; exact moments
   per bin, cell boundaries on bin edges) instead of its raw values: measured on SmolLM2 rows +0.01% SSE at
   1 bit, +0.04% (64-groups) / +0.4% (no groups) at 2 bits and 1-4% *better* at 4 bits (the histogram smooths
   the discrete sample Lloyd-Max gets stuck on), and the cost no longer grows with the row length.
   Levels are stored as integers times a power of two per row (``codebook_format="int"``, the default, base format
   version 4: 6-bit integers in 1- and 2-bit rows, 8-bit in 4-bit rows; :func:`.fit.int_levels` moves the fitted
   levels onto that grid) or as float16 (``"float16"``, version 1); codes are nearest w.r.t. the stored levels and
   the SSE is scored on them, so the decode is what we scored. Measured on SmolLM2 (bench/bench_codebook_storage.py,
   MSE/var, weight MSE): lower with "int" at every budget, 2.0 bits 0.1310 -> 0.1249, 4.0 bits 0.0177 -> 0.0128.
0. **Calibrate** (default; ``QuantizeConfig(calibration=None)`` skips it). :func:`.apply.calibrate` runs the model
   on :mod:`lowra.sdk.training.calibration`'s windows (sample users' train files + pydoc, or the user's folder) and
   records E[x_j^2] per input of every linear and, for ``sensitivity="fisher"``, the mean squared loss gradient of
   its outputs (:mod:`.sensitivity`). Both summaries go into the file's report (per module) and scheme.
3. **Assign precision.** Every row picks a width; the cost of a choice is its packed codes (byte-padded rows) plus
   its codebook (16 * 2**w bits); the distortion is its SSE in weight space, or, calibrated, its expected output
   error sum_j E[x_j^2] (W - Q(W))_rj^2 times its layer's sensitivity (issue 11: by weight MSE the 4-bit base put
   18% of rows at 1-2 bits wherever rows had small variance, whatever the output depended on). A multiple-choice knapsack
   (:func:`lowra.sdk.quant.allocation.assign_precision`, exact at its hull breakpoints; the paper's two ILPs over 128 channel
   clusters approximate the same problem) minimizes total distortion under the budget; with integer codebooks a row's
   codebook costs 6 * 2**w + 8 bits at widths 1 and 2, 8 * 16 + 8 at width 4 (its levels and its exponent). Rows are scored with
   cheap Lloyd-Max starts, then refitted once at their chosen width with the better start (DECISION_GRID /
   FINAL_GRID), so the expensive fit runs once per row instead of three times.
   The budget is **effective bits per quantized parameter with every byte of the file counted** except the
   dense tensors' data (embeddings, norms; stored float16 and reported separately): codes, codebooks, scales,
   the 2-bit width map and the whole safetensors header with all metadata.
4. **Round with error feedback** (``QuantizeConfig(error_feedback=True)``, calibrated only): with widths and
   codebooks fixed, :mod:`.gptq` rounds each layer's columns in order against the calibration inputs' Hessian
   E[x x^T] (recorded in memory only), feeding each column's rounding error to the columns not yet rounded
   (GPTQ). Only codes change; the report carries each layer's output error with nearest and error-fed codes.

Modules, one concern each: :mod:`.config` (QuantizeConfig, torch-free), :mod:`.fit` (one layer: normalize, histogram,
Lloyd-Max, integer levels, pack; ``quantize_weight``), :mod:`.plan` (every row scored, the assignment under the budget, the packed
base), :mod:`.report` (the report in the file's header), :mod:`.apply` (``quantize_model``, ``record_input_stats``),
:mod:`.cache` (``cached_quantized_base``), :mod:`.sensitivity` (``CalibrationStats``, the output Fisher), :mod:`.gptq`
(error-feedback rounding). Baselines (NF, uniform, water-filling, MILP) live in
:mod:`lowra.sdk.quant.baselines`. This package imports none of them, so importing the config never imports torch.
"""
