"""The curated mutation list that ``tests/mutate.py`` applies (see its docstring).

Each entry is one small, realistic bug: an exact text patch to one file, and the tests that must
catch it. ``tests/test_mutation.py`` checks on every run that each patch still applies (its
``old`` text occurs exactly once) and that each named test exists, so the list cannot rot
silently; ``pytest -m mutation`` (or ``python tests/mutate.py``) applies them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    id: str
    package: str  # runtime, reference, export, calib, distill, cli, tests (the TensorRT stand-in)
    file: str
    what: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------ runtime
    Mutation(
        "runtime-euler-sign", "runtime", "runtime/schedule.py",
        "Euler step walks away from the data (dt = sigma - sigma_next)",
        "dt = np.float32(sigma_next) - np.float32(sigma)",
        "dt = np.float32(sigma) - np.float32(sigma_next)",
        ("tests/test_schedule.py::test_euler_loop_matches_scheduler_step",),
    ),
    Mutation(
        "runtime-guidance-base", "runtime", "runtime/schedule.py",
        "guidance extrapolates from the conditional instead of the unconditional velocity",
        "return uncond + np.float32(scale) * (cond - uncond)",
        "return cond + np.float32(scale) * (cond - uncond)",
        ("tests/test_runtime.py::test_matches_the_reference",),
    ),
    Mutation(
        "runtime-mu-sign", "runtime", "runtime/schedule.py",
        "resolution shift intercept with the wrong sign",
        "return image_seq_len * m + b",
        "return image_seq_len * m - b",
        ("tests/test_schedule.py::test_mu_matches_pipeline", "tests/test_schedule.py::test_dynamic_shift_matches_diffusers"),
    ),
    Mutation(
        "manifest-hash-unchecked", "runtime", "runtime/manifest.py",
        "a graph whose sha256 differs from the manifest is run anyway",
        "        if found != expected:\n",
        "        if found != expected and False:\n",
        ("tests/test_manifest.py::test_hash_mismatch",),
    ),
    Mutation(
        "manifest-symlink-escape", "runtime", "runtime/manifest.py",
        "a path that resolves outside the export directory through a symlink is accepted",
        "if path != root and root not in path.parents:",
        "if False:",
        ("tests/test_manifest.py::test_symlink_escaping_export_dir",),
    ),
    # ---------------------------------------------------------------- reference
    Mutation(
        "reference-guidance-base", "reference", "qwen_image2_ref/pipeline.py",
        "reference guidance extrapolates from the conditional velocity",
        "v = v_neg + request.guidance * (v - v_neg)",
        "v = v + request.guidance * (v - v_neg)",
        ("tests/test_pipeline.py::test_guidance_parity",),
    ),
    Mutation(
        "reference-euler-sign", "reference", "qwen_image2_ref/pipeline.py",
        "reference Euler step with the sigma difference reversed",
        "float(sigmas[i + 1] - sigmas[i])",
        "float(sigmas[i] - sigmas[i + 1])",
        ("tests/test_pipeline.py::test_text_to_image_parity",),
    ),
    Mutation(
        "transformer-gate-no-tanh", "reference", "qwen_image2_ref/transformer.py",
        "the MLP residual gate used without its tanh",
        "x = x + torch.tanh(gate2) * self.img_mlp(",
        "x = x + gate2 * self.img_mlp(",
        ("tests/test_transformer.py::test_parity_with_diffusers",),
    ),
    # ------------------------------------------------------------------- export
    Mutation(
        "validate-compares-reference-with-itself", "export", "export/validate.py",
        "validate compares torch's output with itself instead of onnxruntime's",
        "max_abs, rel, cos = compare(ref.float().numpy(), got, valid)",
        "max_abs, rel, cos = compare(ref.float().numpy(), ref.float().numpy(), valid)",
        ("tests/test_validate.py::test_corrupted_graph_fails_with_nonzero_exit",),
    ),
    Mutation(
        "lean-stream-skips-conversion", "export", "export/external_data.py",
        "the lean export streams a weight chunk without converting it to the graph's dtype",
        "        if src == dst:\n            fh_out.write(raw)",
        "        if True:\n            fh_out.write(raw)",
        ("tests/test_lean_export.py::test_streaming_converts_in_chunks_like_torch",),
    ),
    Mutation(
        "iospec-narrow-target-range", "export", "export/iospec.py",
        "the transformer's target-token range stops at a quarter of the declared resolution",
        '"N_t": (1, n_opt, n_max),',
        '"N_t": (1, n_opt, n_max // 4),',
        ("tests/test_runtime.py::test_pil_output_and_defaults", "tests/test_export.py::test_export_directory_and_manifest"),
    ),
)
