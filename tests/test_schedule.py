"""runtime/schedule.py against diffusers' FlowMatchEulerDiscreteScheduler, driven as QwenImage21Pipeline does.

The pipeline builds base sigmas ``np.linspace(1, 1/N, N)`` (or takes fixed ``sample_sigmas``), computes
``mu`` with its module-level ``calculate_shift`` from the scheduler config and calls
``set_timesteps(sigmas=..., mu=...)``. Both sides do the shift in float32, so 1e-6 is a few float32 ulps
at values <= 1000 / 1000 (timesteps are compared relative to their 1000 scale).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift  # noqa: E402

from qwen_image_edge.runtime.errors import ConfigError, InputError  # noqa: E402
from qwen_image_edge.runtime.schedule import (  # noqa: E402
    SchedulerConfig,
    compute_mu,
    default_sigmas,
    euler_step,
    make_sigmas,
    timesteps_from_sigmas,
)

QWEN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
TURBO_SIGMAS = [1.0, 0.978453, 0.954180, 0.926626, 0.895080, 0.845148, 0.704534, 0.414568]
TURBO_SCHEDULER = {**QWEN_SCHEDULER, "use_dynamic_shifting": False, "shift": 1.0, "shift_terminal": None}


def diffusers_schedule(
    scheduler_kwargs: dict, num_steps: int, image_seq_len: int, sigmas: list[float] | None = None
) -> tuple[FlowMatchEulerDiscreteScheduler, np.ndarray, np.ndarray]:
    """The pipeline's step 4 ("Prepare timesteps"), reproduced call for call."""
    sched = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    return sched, sched.sigmas.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("num_steps", [2, 4, 8, 40, 50])
@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 8192, 16384])
def test_dynamic_shift_matches_diffusers(num_steps: int, image_seq_len: int) -> None:
    _, ref_sigmas, ref_timesteps = diffusers_schedule(QWEN_SCHEDULER, num_steps, image_seq_len)
    config = SchedulerConfig(**QWEN_SCHEDULER)
    sigmas = make_sigmas(num_steps, image_seq_len, config)
    timesteps = timesteps_from_sigmas(sigmas, config)

    assert sigmas.dtype == np.float32 and sigmas.shape == (num_steps + 1,)
    assert timesteps.shape == (num_steps,)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6, equal_nan=False)
    np.testing.assert_allclose(timesteps / 1000, ref_timesteps / 1000, rtol=0, atol=1e-6, equal_nan=False)
    assert sigmas[0] == pytest.approx(1.0, abs=1e-6) and sigmas[-1] == 0.0
    assert sigmas[-2] == pytest.approx(0.02, abs=1e-6)  # the stretch pins the last non-zero sigma
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # diffusers' 0/0
@pytest.mark.parametrize("image_seq_len", [64, 4096, 16384])
def test_single_step_is_one_to_zero_where_diffusers_gives_nan(image_seq_len: int) -> None:
    # With one step the base grid is [1]; the terminal stretch divides 0 by 0. diffusers returns NaN
    # (a 1-step pipeline call produces NaN latents); we skip the undefined stretch. If diffusers ever
    # fixes this, the first assert fails and the single step should be compared like the others.
    _, ref_sigmas, _ = diffusers_schedule(QWEN_SCHEDULER, 1, image_seq_len)
    assert np.isnan(ref_sigmas[0])
    config = SchedulerConfig(**QWEN_SCHEDULER)
    sigmas = make_sigmas(1, image_seq_len, config)
    np.testing.assert_array_equal(sigmas, np.array([1.0, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(timesteps_from_sigmas(sigmas, config), np.array([1000.0], dtype=np.float32))


@pytest.mark.parametrize("image_seq_len", [64, 1024, 16384])
def test_mu_matches_pipeline(image_seq_len: int) -> None:
    config = SchedulerConfig(**QWEN_SCHEDULER)
    expected = calculate_shift(image_seq_len, 256, 8192, 0.5, 0.9)
    assert compute_mu(image_seq_len, config) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("num_steps", [4, 40])
def test_linear_time_shift_matches_diffusers(num_steps: int) -> None:
    kwargs = {**QWEN_SCHEDULER, "time_shift_type": "linear"}
    _, ref_sigmas, _ = diffusers_schedule(kwargs, num_steps, 4096)
    sigmas = make_sigmas(num_steps, 4096, SchedulerConfig(**kwargs))
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_matches_diffusers(shift: float) -> None:
    kwargs = {**QWEN_SCHEDULER, "use_dynamic_shifting": False, "shift": shift}
    _, ref_sigmas, ref_timesteps = diffusers_schedule(kwargs, 20, 1024)
    config = SchedulerConfig(**kwargs)
    sigmas = make_sigmas(20, 1024, config)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps_from_sigmas(sigmas, config) / 1000, ref_timesteps / 1000, atol=1e-6)


@pytest.mark.parametrize("image_seq_len", [256, 4096])
def test_turbo_fixed_sigmas_match_diffusers(image_seq_len: int) -> None:
    _, ref_sigmas, ref_timesteps = diffusers_schedule(TURBO_SCHEDULER, 8, image_seq_len, sigmas=TURBO_SIGMAS)
    config = SchedulerConfig(**TURBO_SCHEDULER)
    sigmas = make_sigmas(None, image_seq_len, config, fixed_sigmas=TURBO_SIGMAS)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps_from_sigmas(sigmas, config) / 1000, ref_timesteps / 1000, atol=1e-6)
    # With no shift and no stretch the grid is used as given, plus the terminal 0.
    np.testing.assert_allclose(sigmas, [*TURBO_SIGMAS, 0.0], atol=1e-7)
    assert np.array_equal(make_sigmas(8, image_seq_len, config, fixed_sigmas=TURBO_SIGMAS), sigmas)


def test_fixed_sigmas_with_dynamic_shift_match_diffusers() -> None:
    # A fixed grid still goes through the scheduler's shift and stretch, as diffusers does with sigmas=.
    _, ref_sigmas, _ = diffusers_schedule(QWEN_SCHEDULER, 8, 4096, sigmas=TURBO_SIGMAS)
    sigmas = make_sigmas(None, 4096, SchedulerConfig(**QWEN_SCHEDULER), fixed_sigmas=TURBO_SIGMAS)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps", [4, 40])
def test_euler_loop_matches_scheduler_step(num_steps: int) -> None:
    image_seq_len = 256
    sched, _, ref_timesteps = diffusers_schedule(QWEN_SCHEDULER, num_steps, image_seq_len)
    sched.set_begin_index(0)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, image_seq_len, 64), dtype=np.float32)
    velocities = rng.standard_normal((num_steps, 2, image_seq_len, 64), dtype=np.float32)

    ref = torch.from_numpy(x0)
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(torch.from_numpy(velocities[i]), t, ref, return_dict=False)[0]

    sigmas = make_sigmas(num_steps, image_seq_len, SchedulerConfig(**QWEN_SCHEDULER))
    ours = x0
    for i in range(num_steps):
        ours = euler_step(ours, velocities[i], float(sigmas[i]), float(sigmas[i + 1]))

    assert ours.dtype == np.float32
    # Both sides add dt * v in float32 per step; the latents are O(1) to O(sqrt(N)).
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-6)
    assert len(ref_timesteps) == num_steps


def test_config_from_diffusers_scheduler_config_json(tmp_path) -> None:
    FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER).save_config(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data["_class_name"] == "FlowMatchEulerDiscreteScheduler"  # the real file, with extra keys
    config = SchedulerConfig.from_dict(data)
    assert config == SchedulerConfig(**QWEN_SCHEDULER)
    turbo = FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER)
    turbo.save_config(tmp_path / "turbo")
    turbo_config = SchedulerConfig.from_dict(
        json.loads((tmp_path / "turbo" / "scheduler_config.json").read_text())
    )
    assert turbo_config.shift_terminal is None and turbo_config.use_dynamic_shifting is False
    assert SchedulerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "option",
    [
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "invert_sigmas",
        "stochastic_sampling",
    ],
)
def test_config_rejects_scheduler_options_it_does_not_implement(tmp_path, option: str) -> None:
    # Ignoring these would silently give sigmas (or steps) different from diffusers'. The flag is set
    # in the saved file because diffusers needs scipy to even build a scheduler with beta sigmas.
    FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER).save_config(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data[option] is False
    assert SchedulerConfig.from_dict(data) == SchedulerConfig(**QWEN_SCHEDULER)
    data[option] = True
    with pytest.raises(ConfigError, match=option):
        SchedulerConfig.from_dict(data)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "4", None])
def test_bad_step_count_raises_input_error(steps) -> None:
    config = SchedulerConfig(**QWEN_SCHEDULER)
    with pytest.raises(InputError, match="steps"):
        make_sigmas(steps, 1024, config)
    if steps is not None:
        with pytest.raises(InputError, match="steps"):
            default_sigmas(steps)


def test_fixed_sigmas_inconsistent_with_steps_raises_input_error() -> None:
    config = SchedulerConfig(**TURBO_SCHEDULER)
    with pytest.raises(InputError, match="8 sigmas"):
        make_sigmas(4, 1024, config, fixed_sigmas=TURBO_SIGMAS)
    with pytest.raises(InputError, match="non-empty"):
        make_sigmas(None, 1024, config, fixed_sigmas=[])


def test_dynamic_shift_needs_mu() -> None:
    from qwen_image_edge.runtime.schedule import shift_sigmas

    with pytest.raises(ConfigError, match="mu"):
        shift_sigmas(default_sigmas(4), SchedulerConfig(**QWEN_SCHEDULER), None)
