"""Step distillation: a few-step, guidance-free student of a many-step teacher.

Method: trajectory (segment) distillation on the teacher's own probability-flow ODE.

1. The student's grid for N steps is what any N-step run uses: ``default_sigmas(N)`` through the
   teacher's scheduler (dynamic shift, terminal stretch), so the "fixed sigmas" stored in its
   ``model_index.json`` are that base grid. The teacher samples a pool of prompts from fixed noise
   with classifier-free guidance on a 40-step grid that contains every student sigma (the 40 Euler
   steps spread over the student intervals), and we record its latents at the student sigmas.
2. The student (initialised from the teacher) learns, for every segment ``[s_k, s_k+1]`` of its
   grid, the single velocity that carries the teacher's latent at ``s_k`` to the teacher's latent
   at ``s_k+1`` in one Euler step: ``v* = (x_teacher(s_k+1) - x_teacher(s_k)) / (s_k+1 - s_k)``.
   It sees the positive prompt only, so guidance is distilled in: one transformer call per step.

Why this and not DMD / consistency training: the targets are deterministic regressions on
recorded teacher states (no fake-score network, no adversarial loss, no target network), which
trains stably in minutes on CPU for the demo model, makes the multi-process run bit-comparable
to the single-process one, and matches the fixed-sigma, guidance-free interface of
Qwen-Image-Lightning / -Turbo that the runtime already serves. Its known weakness — each step is
trained from teacher states, not from the student's own slightly-off states — is measured by
``bench/distill.py`` (latent distance to the teacher's 40-step output).

Modules: ``pool`` (teacher trajectories), ``trainer`` (torch.distributed training, checkpoints,
the student folder), ``fsdp`` (``--strategy fsdp``: FSDP2 sharding, bf16 mixed precision, DCP
checkpoints that resume on any world size), ``lora_student`` (``--lora``). Entry points: ``qwen-image-edge distill`` and ``torchrun -m qwen_image_edge.distill``.
"""
