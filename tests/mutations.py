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


F = "tests/test_cli_flags.py::"
T = "tests/test_tensorrt.py::"
Q = "tests/test_quant.py::"
D = "tests/test_distill.py::test_student_lands_nearer_the_many_step_teacher_than_the_few_step_teacher"

MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------ runtime
    Mutation(
        "runtime-euler-sign", "runtime", "runtime/schedule.py",
        "Euler step walks away from the data (dt = sigma - sigma_next)",
        "dt = float(np.float32(sigma_next) - np.float32(sigma))",
        "dt = float(np.float32(sigma) - np.float32(sigma_next))",
        ("tests/test_schedule.py::test_euler_loop_matches_scheduler_step",),
    ),
    Mutation(
        "runtime-guidance-base", "runtime", "runtime/schedule.py",
        "guidance extrapolates from the conditional instead of the unconditional velocity",
        "return uncond + float(np.float32(scale)) * (cond - uncond)",
        "return cond + float(np.float32(scale)) * (cond - uncond)",
        # the reference calls the same function, so runtime-vs-reference cannot see it: diffusers can
        ("tests/test_pipeline.py::test_guidance_parity",
         "tests/test_loop_pieces.py::test_guidance_is_one_formula_for_numpy_and_torch"),
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
    Mutation(
        "device-loop-feeds-host-per-step", "runtime", "runtime/device_loop.py",
        "the device loop feeds the KV-cache step's rope tables and key mask from the host at every step",
        'return {"kv_cache": cache, **{k: up(v) for k, v in cond.step_feeds.items()}}',
        'return {"kv_cache": cache, **cond.step_feeds}',
        ("tests/test_device_loop.py::test_device_loop_bytes_per_step_are_constant_and_tiny[guidance-text-kv-pair]",),
    ),
    Mutation(
        "counting-backend-misses-bound-feeds", "runtime", "runtime/backends/counting.py",
        "the counting backend does not count the numpy feeds of a bound (device-loop) call",
        "self.traffic.add(self.spec.name, _host_bytes(feeds.values()))",
        "self.traffic.add(self.spec.name)",
        ("tests/test_device_loop.py::test_device_loop_bytes_per_step_are_constant_and_tiny[no-guidance-text-kv-pair]",),
    ),
    Mutation(
        "sampler-step-guidance-base", "export", "export/sampler_step.py",
        "the sampler_step graph extrapolates guidance from the conditional velocity",
        "v = velocity_uncond + guidance * (velocity - velocity_uncond)  # [B, N_t, C]",
        "v = velocity + guidance * (velocity - velocity_uncond)  # [B, N_t, C]",
        ("tests/test_device_loop.py::test_sampler_step_graph_is_the_host_update",),
    ),
    # ---------------------------------------------------------------- reference
    Mutation(
        "reference-guidance-base", "reference", "qwen_image2_ref/pipeline.py",
        "reference guidance extrapolates from the conditional velocity",
        "v = schedule.apply_guidance(v, v_neg, request.guidance)",
        "v = v + request.guidance * (v - v_neg)",
        ("tests/test_pipeline.py::test_guidance_parity",),
    ),
    Mutation(
        "reference-euler-sign", "reference", "qwen_image2_ref/pipeline.py",
        "reference Euler step with the sigma difference reversed",
        "schedule.euler_step(x.float(), v.float(), sigmas[i], sigmas[i + 1])",
        "schedule.euler_step(x.float(), v.float(), sigmas[i + 1], sigmas[i])",
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
        "max_abs, rel, cos = compare(ref.float().cpu().numpy(), got, valid)",
        "max_abs, rel, cos = compare(ref.float().cpu().numpy(), ref.float().cpu().numpy(), valid)",
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
        ("tests/test_edit_aspect.py::test_default_demo_export_edits_photos",),
    ),
    # ------------------------------------------------------------------ pixels (runtime, shared with the reference)
    Mutation(
        "to-images-truncate", "runtime", "runtime/sampling.py",
        "pixels truncated to uint8 instead of rounded",
        "arr = np.round(to_unit(pixels) * 255).astype(np.uint8)",
        "arr = (to_unit(pixels) * 255).astype(np.uint8)",
        ("tests/test_pixels.py",),
    ),
    Mutation(
        "to-images-no-clamp", "runtime", "runtime/sampling.py",
        "pixels outside [-1, 1] wrap around instead of being clamped",
        "return np.clip(pixels.astype(np.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)",
        "return pixels.astype(np.float32).transpose(0, 2, 3, 1) / 2 + 0.5",
        ("tests/test_pixels.py::test_to_images_is_diffusers_postprocess",),
    ),
    Mutation(
        "runtime-guidance-1pct", "runtime", "runtime/pipeline.py",
        "runtime guidance 1% too strong",
        "v = schedule.apply_guidance(v, v_neg, request.guidance)",
        "v = schedule.apply_guidance(v, v_neg, request.guidance * 1.01)",
        ("tests/test_runtime.py::test_demo_text_to_image_matches_the_reference",),
    ),
    Mutation(
        "runtime-timestep-1pct", "runtime", "runtime/pipeline.py",
        "the transformer's timestep 1% off the sigma",
        "timestep = np.full((x.shape[0],), sigma, dtype=np.float32)",
        "timestep = np.full((x.shape[0],), sigma * 1.01, dtype=np.float32)",
        ("tests/test_runtime.py::test_matches_the_reference",),
    ),
    Mutation(
        "runtime-one-step-short", "runtime", "runtime/pipeline.py",
        "the runtime loop skips the last step",
        "for i in range(request.steps):",
        "for i in range(request.steps - 1):",
        (F + "test_api_keywords",),
    ),
    Mutation(
        "ort-threads-inter-op", "runtime", "runtime/backends/onnxruntime.py",
        "the thread count goes to inter-op instead of intra-op parallelism",
        "opts.intra_op_num_threads = threads",
        "opts.inter_op_num_threads = threads",
        (F + "test_threads_reach_onnxruntime",),
    ),
    Mutation(
        "reference-negative-is-positive", "reference", "qwen_image2_ref/pipeline.py",
        "the reference encodes the prompt as its own negative",
        "negative = self._encode(request.negative_prompts, vl_images",
        "negative = self._encode(request.prompts, vl_images",
        (F + "test_api_keywords",),
    ),
    # ---------------------------------------------------------------------- cli
    Mutation(
        "cli-ignores-seed", "cli", "qwen_image_edge/cli.py",
        "--seed is ignored (always 0)",
        "steps=args.steps, guidance=args.guidance, seed=args.seed)",
        "steps=args.steps, guidance=args.guidance, seed=0)",
        (F + "test_seed",),
    ),
    Mutation(
        "cli-ignores-guidance", "cli", "qwen_image_edge/cli.py",
        "--guidance is ignored (the model's default is used)",
        "guidance=args.guidance, seed=args.seed)",
        "guidance=None, seed=args.seed)",
        (F + "test_guidance_negative_prompt_and_steps",),
    ),
    Mutation(
        "cli-ignores-negative-prompt", "cli", "qwen_image_edge/cli.py",
        "--negative-prompt is ignored",
        "dict(negative_prompt=args.negative_prompt,",
        "dict(negative_prompt=None,",
        (F + "test_guidance_negative_prompt_and_steps",),
    ),
    Mutation(
        "cli-steps-off-by-one", "cli", "qwen_image_edge/cli.py",
        "--steps N runs N + 1 steps",
        "steps=args.steps, guidance=args.guidance, seed=args.seed)",
        "steps=args.steps and args.steps + 1, guidance=args.guidance, seed=args.seed)",
        (F + "test_every_flag_reaches_the_call",),
    ),
    Mutation(
        "cli-ignores-height", "cli", "qwen_image_edge/cli.py",
        "--height is ignored",
        "height=args.height,",
        "height=None,",
        (F + "test_every_flag_reaches_the_call",),
    ),
    Mutation(
        "cli-run-ignores-threads", "cli", "qwen_image_edge/cli.py",
        "run --threads never reaches onnxruntime",
        "Pipeline.load(export_dir, threads=args.threads, **load)",
        "Pipeline.load(export_dir, **load)",
        (F + "test_threads_reach_onnxruntime",),
    ),
    Mutation(
        "cli-torch-threads-fixed", "cli", "qwen_image_edge/cli.py",
        "generate/edit --threads never reaches torch",
        "torch.set_num_threads(args.threads)",
        "torch.set_num_threads(1)",
        (F + "test_threads_reach_torch",),
    ),
    Mutation(
        "cli-metadata-first-seed", "cli", "qwen_image_edge/cli.py",
        "--num-images: every PNG records the first image's seed",
        "task=task, prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed,",
        "task=task, prompt=prompt, negative_prompt=args.negative_prompt, seed=first,",
        ("tests/test_cli_hardening.py::test_num_images",),
    ),
    Mutation(
        "cli-jpeg-background-ignored", "cli", "qwen_image_edge/outputs.py",
        "JPEG outputs are flattened onto white whatever --background says",
        "image = flatten(image, background)",
        "image = flatten(image, (255, 255, 255))",
        ("tests/test_cli_hardening.py::test_jpeg_flattens_alpha_onto_the_background",),
    ),
    Mutation(
        "runtime-16bit-clipped", "runtime", "runtime/images.py",
        "16-bit greyscale images are clipped to 8 bits instead of scaled (Pillow's own convert)",
        'return Image.fromarray(_scale_to_uint8(arr, 65535.0), "L")',
        'return img.convert("L")',
        ("tests/test_images_hardening.py::test_sixteen_bit_grey_png_is_scaled_not_clipped",),
    ),
    # ------------------------------------------------- TensorRT backend and build, against the strict stand-in
    Mutation(
        "trt-free-without-sync-close", "runtime", "runtime/backends/tensorrt.py",
        "close() frees device buffers while copies may still be queued",
        "            self.stream.synchronize()  # nothing queued may still use the buffers freed below\n",
        "",
        (T + "test_a_failed_enqueue_leaves_nothing_queued_on_freed_buffers",),
    ),
    Mutation(
        "trt-no-alias-check", "runtime", "runtime/backends/tensorrt.py",
        "a device input inside one of the session's own outputs is not refused",
        "                self._check_not_an_output(t.name, value)\n",
        "",
        (T + "test_aliased_input_and_output_are_refused",),
    ),
    Mutation(
        "trt-kept-output-half-copied", "runtime", "runtime/backends/tensorrt.py",
        "a kept output (the KV cache) is copied only half-way",
        "out.nbytes, self.stream)",
        "out.nbytes // 2, self.stream)",
        ("tests/test_kv_cache_export.py::test_tensorrt_builds_the_pair_and_keeps_the_cache_on_the_device",),
    ),
    Mutation(
        "trt-qdq-weakly-typed", "export", "export/tensorrt.py",
        "a Q/DQ graph's network is created without STRONGLY_TYPED",
        "flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode.strongly_typed else 0",
        "flags = 0",
        (T + "test_qdq_graphs_build_strongly_typed_only",),
    ),
    Mutation(
        "trt-bf16-built-as-fp16", "export", "export/tensorrt.py",
        "--precision bf16 sets the FP16 builder flag",
        'mode = NetworkMode(False, ("FP16" if target is Precision.FP16 else "BF16",), target)',
        'mode = NetworkMode(False, ("FP16",), target)',
        (T + "test_fp16_and_bf16_engines_compute_in_reduced_precision",),
    ),
    # ------------------------------------------------------------------ distill
    Mutation(
        "distill-target-sign", "distill", "distill/trainer.py",
        "the segment's velocity target with its sign flipped",
        "target = (x_out - x_in) / (s1 - s0)[:, None, None]",
        "target = (x_in - x_out) / (s1 - s0)[:, None, None]",
        (D,),
    ),
    Mutation(
        "distill-target-x2", "distill", "distill/trainer.py",
        "the segment's velocity target twice too large",
        "target = (x_out - x_in) / (s1 - s0)[:, None, None]",
        "target = 2 * (x_out - x_in) / (s1 - s0)[:, None, None]",
        (D,),
    ),
    Mutation(
        "distill-target-half", "distill", "distill/trainer.py",
        "the segment's velocity target divided by twice the sigma step",
        "target = (x_out - x_in) / (s1 - s0)[:, None, None]",
        "target = (x_out - x_in) / (2 * (s1 - s0))[:, None, None]",
        (D,),
    ),
    Mutation(
        "distill-segment-to-the-end", "distill", "distill/trainer.py",
        "every segment regresses towards the trajectory's last point",
        "x_in, x_out = group.points[ids_t, start], group.points[ids_t, end]",
        "x_in, x_out = group.points[ids_t, start], group.points[ids_t, -1]",
        (D,),
    ),
    # -------------------------------------------- the demo model follows its prompts (margin over prompt-blind)
    Mutation(
        "reference-one-prompt-for-all", "reference", "qwen_image2_ref/pipeline.py",
        "every image of a batch drawn from the first prompt",
        "positive = self._encode(request.prompts, vl_images",
        "positive = self._encode(request.prompts[:1] * batch, vl_images",
        ("tests/test_demo_model.py::test_demo_follows_heldout_prompts",),
    ),
    Mutation(
        "reference-prompts-reversed", "reference", "qwen_image2_ref/pipeline.py",
        "a batch's prompts shuffled before generation",
        "positive = self._encode(request.prompts, vl_images",
        "positive = self._encode(request.prompts[::-1], vl_images",
        ("tests/test_demo_student.py::test_student_follows_heldout_prompts_in_four_calls",),
    ),
    # -------------------------------------------------------------------- calib
    Mutation(
        "calib-amax-x2", "calib", "calib/quantize.py",
        "calibrated activation ranges doubled",
        "amax = (r * pqs.float()).amax() if pqs is not None else r.amax()",
        "amax = 2 * ((r * pqs.float()).amax() if pqs is not None else r.amax())",
        (Q + "test_graph_scales_follow_independently_recorded_ranges", Q + "test_manifest_records_policy_and_calibration"),
    ),
    Mutation(
        "calib-amax-half", "calib", "calib/quantize.py",
        "calibrated activation ranges halved (activations clip)",
        "amax = (r * pqs.float()).amax() if pqs is not None else r.amax()",
        "amax = 0.5 * ((r * pqs.float()).amax() if pqs is not None else r.amax())",
        (Q + "test_quantized_layers_err_against_fp32_as_their_grids_predict",),
    ),
    Mutation(
        "calib-weight-scale-x2", "calib", "calib/quantize.py",
        "int8 weight scale twice too large (the 7-bit range rescale doubled)",
        "wq.amax = wq.amax * (INT8_MAX / REDUCED_WEIGHT_MAX)",
        "wq.amax = wq.amax * (2 * INT8_MAX / REDUCED_WEIGHT_MAX)",
        (Q + "test_int8_weights_are_stored_pre_transposed_and_small",),
    ),
    Mutation(
        "calib-fp8-weight-rescaled", "calib", "calib/quantize.py",
        "the int8-only 7-bit weight rescale also applied to fp8 (fp8 weight scale x2)",
        "if policy.precision is Precision.INT8 and policy.weight_reduce_range:",
        "if policy.weight_reduce_range:",
        (Q + "test_graph_scales_follow_independently_recorded_ranges",),
    ),
    Mutation(
        "calib-weight-axis", "calib", "calib/quantize.py",
        "per-channel weight scales along the input axis",
        "w_axis = 0 if policy.weight_granularity",
        "w_axis = 1 if policy.weight_granularity",
        (Q + "test_int8_weights_are_stored_pre_transposed_and_small",),
    ),
    Mutation(
        "qdq-axis-not-transposed", "export", "export/qdq.py",
        "the weight DQ keeps the pre-transpose axis (the fused int8 kernel ignores it; the unfused graph does not)",
        "dims, axis = dims[::-1], 1 - axis",
        "dims, axis = dims[::-1], axis",
        (Q + "test_onnxruntime_matches_modelopt_simulated_quantization",),
    ),
    Mutation(
        "qdq-weights-not-transposed", "export", "export/qdq.py",
        "stored weights not transposed to MatMul's [in, out] layout",
        "reshape(dims).T.copy().tobytes()",
        "reshape(dims).copy().tobytes()",
        (Q + "test_onnxruntime_matches_modelopt_simulated_quantization",),
    ),
    Mutation(
        "qdq-zero-point", "export", "export/qdq.py",
        "int8 weights stored with a zero point off by one",
        "+ zero_point.astype(np.float32), -128, 127)",
        "+ zero_point.astype(np.float32) + 1, -128, 127)",
        (Q + "test_int8_weights_are_stored_pre_transposed_and_small",),
    ),
    Mutation(
        "qdq-fp8-zero-point", "export", "export/qdq.py",
        "fp8 Q/DQ written with a non-zero zero point",
        "TensorProto.FLOAT8E4M3FN, [], [0.0])",
        "TensorProto.FLOAT8E4M3FN, [], [1.0])",
        (Q + "test_graph_scales_follow_independently_recorded_ranges",),
    ),
    # -------------------------------------------- the demo trainer resumes bit for bit, checkpoints survive kills
    Mutation(
        "demo-resume-data-order", "reference", "qwen_image2_ref/demo/resume.py",
        "a resumed stage restarts its data order (the numpy generator's state is not restored)",
        "    state.rng.bit_generator.state = meta[\"numpy_rng\"]\n",
        "",
        ("tests/test_demo_train.py::test_trainer_resumes_bit_exact_after_interruptions_in_every_stage",),
    ),
    Mutation(
        "demo-checkpoint-in-place", "reference", "qwen_image2_ref/demo/resume.py",
        "the checkpoint is written over the previous one instead of to a temp file and renamed",
        'tmp = path.with_name(path.name + ".tmp")',
        "tmp = path",
        ("tests/test_demo_train.py::test_a_kill_mid_write_leaves_the_previous_checkpoint",),
    ),
    Mutation(
        "demo-v2-background-always", "reference", "qwen_image2_ref/demo/captions.py",
        "v2 captions always name the background (the model never learns to choose one)",
        "    if not background:\n        return text\n",
        "    if False:\n        return text\n",
        ("tests/test_demo_captions.py::test_v2_captions_name_every_attribute_and_the_background_only_when_asked",
         "tests/test_demo_captions.py::test_v2_background_is_optional_at_its_share_and_every_template_takes_one_or_two_objects"),
    ),
    # -------------------------------------------- the lean quantized export (full size) stores what the TorchScript one does
    Mutation(
        "qdq-lean-no-smoothing", "export", "export/qdq_lean.py",
        "the lean export quantizes the checkpoint weight without SmoothQuant's fold (W, not W / pre_quant_scale)",
        "        w.mul_((1.0 / torch.from_numpy(layer.pre_quant_scale))[None, :])",
        "        pass",
        ("tests/test_quant_lean.py::test_lean_graph_stores_the_torchscript_paths_bytes",),
    ),
    Mutation(
        "qdq-lean-links-shards", "export", "export/lean.py",
        "the quantized graph links the checkpoint shards (the unquantized weights travel with the export)",
        "data_files = attach_weights(proto, sources, graph_dir, name, link=scales is None)",
        "data_files = attach_weights(proto, sources, graph_dir, name, link=True)",
        ("tests/test_quant_lean.py::test_lean_graph_holds_no_unquantized_copy",),
    ),
    # -------------------------------------------- edge footprint: staged loading, the int4 encoder
    Mutation(
        "staging-never-releases", "runtime", "runtime/staging.py",
        "low memory opens each graph lazily but never releases the previous stage's (peak = all graphs)",
        'for name in [n for n in self._open if stage_of(n) != stage]:',
        'for name in [n for n in self._open if stage_of(n) != stage and not stage]:',
        ("tests/test_staging.py::test_stages_release_before_the_next_opens",),
    ),
    Mutation(
        "encoder-int4-scale-off", "export", "export/int4.py",
        "the int4 export's block scales use 8 levels (amax / 8) where modelopt's simulation used 7",
        "scales = np.maximum(amax, 1e-12) / INT4_MAX",
        "scales = np.maximum(amax, 1e-12) / (INT4_MAX + 1)",
        ("tests/test_encoder_quant.py::test_int4_export_is_blockwise_dequantize_linear_in_opset_21",),
    ),
    # -------------------------------------------------------------------- LoRA adapter files
    Mutation(
        "lora-kohya-alpha-ignored", "reference", "qwen_image2_ref/lora.py",
        "a Lightning (lora_down/lora_up/alpha) adapter is fused at scale 1 instead of alpha / rank",
        'scale = float(p["alpha"].float().reshape(-1)[0]) / rank if "alpha" in p else 1.0',
        "scale = 1.0",
        ("tests/test_lora.py::test_lightning_format_alpha_over_rank",),
    ),
    Mutation(
        "lora-lean-not-fused", "export", "export/lean.py",
        "the lean export streams the base weights: the adapter is listed in the manifest but not fused",
        "sources = fuse_sources(sources, model.loras)",
        "sources = fuse_sources(sources, ())",
        ("tests/test_lora.py::test_lean_export_streams_the_fused_weights",),
    ),
    # -------------------------------------------------------------------- serve
    Mutation(
        "serve-shape-error-503", "cli", "qwen_image_edge/serve_http.py",
        "serve answers a bad image or tensor shape (ShapeError) as the server's fault (503), not the client's 400",
        "if isinstance(exc, (InputError, ShapeError, ConfigError)):",
        "if isinstance(exc, (InputError, ConfigError)):",
        ("tests/test_serve.py::test_error_bodies_are_one_line_and_statuses_split_client_from_server",),
    ),
    # -------------------------------------------------------------------- refit
    Mutation(
        "refit-weights-never-applied", "export", "export/refit.py",
        "refit sets the adapter-fused weights but never calls refit_cuda_engine: the engine written keeps the old ones",
        "if not refitter.refit_cuda_engine():",
        "if refitter.get_missing_weights():",
        ("tests/test_refit.py::test_refit_engine_equals_an_engine_built_from_the_fused_export",),
    ),
    # -------------------------------------------------------------------- distill --strategy fsdp
    Mutation(
        "fsdp-bf16-policy-dropped", "distill", "distill/fsdp.py",
        "--mixed-precision bf16 keeps FSDP's all-gathered weights in fp32 (the policy's param_dtype is lost)",
        "param_dtype=torch.bfloat16 if bf16 else None",
        "param_dtype=None",
        ("tests/test_distill_fsdp.py::test_bf16_mixed_precision_computes_in_bf16_over_fp32_masters",),
    ),
    Mutation(
        "fsdp-checkpoint-without-optimizer", "distill", "distill/fsdp.py",
        "the DCP checkpoint holds the student but not AdamW's moments and step",
        'dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)',
        'dcp.save({"model": model_sd}, checkpoint_id=folder)',
        ("tests/test_distill_fsdp.py::test_interrupted_and_resumed_in_one_process_is_exact",),
    ),
    # -------------------------------------------------------------------- edge: int8 table, int4 transformer
    Mutation(
        "embedding-scale-per-tensor", "export", "export/encoder_qdq.py",
        "the int8 embedding table gets one scale for all rows: rare tokens' small rows lose most of their levels",
        "scales = (np.maximum(np.abs(table).max(axis=1), 1e-12) / EMBED_MAX).astype(np.float32)  # [vocab]",
        "scales = np.full(len(table), np.abs(table).max() / EMBED_MAX, np.float32)  # [vocab]",
        ("tests/test_edge_int8_embedding.py::test_each_row_gets_its_own_scale",),
    ),
    Mutation(
        "int4-awq-scale-dropped", "export", "export/int4.py",
        "the int4 graph drops AWQ's per-channel input scale: weights divided by it, inputs never multiplied",
        "DequantizedLinear(dequantized, pqs, bias))",
        "DequantizedLinear(dequantized, None, bias))",
        ("tests/test_transformer_int4.py::test_graph_is_int4_blocked_dequantize_and_computes_the_module",),
    ),
    Mutation(
        "int4-transformer-rest-fp32", "export", "export/int4.py",
        "the int4 transformer keeps its unquantized linears in fp32 (edge's projected bytes grow by ~0.25 GB)",
        "    halved = store_half_weights(model)",
        "    halved = 0",
        ("tests/test_transformer_int4.py::test_graph_is_int4_blocked_dequantize_and_computes_the_module",),
    ),
)
