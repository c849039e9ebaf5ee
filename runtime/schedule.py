"""Flow-matching sigma schedules (numpy), the Euler step and guidance (numpy or torch).

Shared by the reference pipeline and the runtime so the two cannot drift. The numbers follow
diffusers' ``FlowMatchEulerDiscreteScheduler`` as the Qwen-Image pipelines drive it: base sigmas
``linspace(1, 1/N, N)`` (or a fixed list, as distilled models use), a resolution-dependent
exponential shift ``mu = m * image_tokens + b``, an optional stretch so the last sigma equals
``shift_terminal``, then a terminal 0 appended. The arithmetic is done in float32 where diffusers
does it in float32, so sigmas agree to the last bit or two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_image_edge.runtime.errors import ConfigError, InputError

# diffusers FlowMatchEulerDiscreteScheduler options that the Qwen-Image pipelines leave off.
_UNSUPPORTED_OPTIONS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of ``scheduler/scheduler_config.json`` that change the sigmas."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("exponential", "linear"):
            raise ConfigError(
                f"scheduler time_shift_type: expected 'exponential' or 'linear', got {self.time_shift_type!r}"
            )
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ConfigError(
                "scheduler: max_image_seq_len must exceed base_image_seq_len, got "
                f"{self.max_image_seq_len} <= {self.base_image_seq_len}"
            )
        if self.shift_terminal is not None and not 0.0 < self.shift_terminal < 1.0:
            raise ConfigError(f"scheduler shift_terminal: expected a value in (0, 1), got {self.shift_terminal}")
        if self.shift <= 0:
            raise ConfigError(f"scheduler shift: expected > 0, got {self.shift}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers ``scheduler_config.json`` dict; unknown keys are ignored.

        Options that would change the sigmas or the step in ways this module does not implement are
        rejected rather than ignored, so a config never silently samples differently from diffusers.
        """
        unsupported = [k for k in _UNSUPPORTED_OPTIONS if data.get(k)]
        if unsupported:
            raise ConfigError(f"scheduler config: {unsupported} are not supported; expected them unset or false")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted base grid ``linspace(1, 1/N, N)`` (float32, without the terminal 0)."""
    _check_steps(num_steps)
    return np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)


def compute_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """Resolution-dependent shift: linear in the number of target image tokens."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def shift_sigmas(sigmas: np.ndarray, config: SchedulerConfig, mu: float | None) -> np.ndarray:
    """Apply the dynamic (mu) or static (shift) time shift, then the terminal stretch."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    if config.use_dynamic_shifting:
        if mu is None:
            raise ConfigError("scheduler uses dynamic shifting: mu (from the image token count) is required")
        if config.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    sigmas = sigmas.astype(np.float32)
    # The stretch is undefined when the last sigma is 1 (a single step from pure noise): diffusers
    # divides 0 by 0 and returns NaN there; we keep the grid as it is.
    if config.shift_terminal and sigmas[-1] < 1:
        one_minus = 1 - sigmas
        scale = one_minus[-1] / (1 - config.shift_terminal)
        sigmas = (1 - one_minus / scale).astype(np.float32)
    return sigmas


def make_sigmas(
    num_steps: int | None,
    image_seq_len: int,
    config: SchedulerConfig,
    *,
    fixed_sigmas: Sequence[float] | None = None,
) -> np.ndarray:
    """Sigmas for one sampling run, float32 ``[N + 1]``, ending in 0.

    ``fixed_sigmas`` (a distilled model's grid, without the terminal 0) replaces the base grid;
    the scheduler's shift and stretch are still applied, as diffusers does with ``sigmas=``.
    """
    if fixed_sigmas is not None:
        base = np.asarray(fixed_sigmas, dtype=np.float32)
        if base.ndim != 1 or base.size == 0:
            raise InputError(f"fixed sigmas: expected a non-empty list, got shape {base.shape}")
        if num_steps is not None and num_steps != base.size:
            raise InputError(f"steps: the fixed schedule has {base.size} sigmas, got steps={num_steps}")
    else:
        if num_steps is None:
            raise InputError("steps: a number of steps or a fixed sigma list is required")
        base = default_sigmas(num_steps)
    mu = compute_mu(image_seq_len, config) if config.use_dynamic_shifting else None
    shifted = shift_sigmas(base, config, mu)
    return np.concatenate([shifted, np.zeros(1, dtype=np.float32)])


def timesteps_from_sigmas(sigmas: np.ndarray, config: SchedulerConfig) -> np.ndarray:
    """Model timesteps (``1000 * sigma``) for every step, without the terminal entry."""
    return (np.asarray(sigmas[:-1], dtype=np.float32) * np.float32(config.num_train_timesteps)).astype(np.float32)


def euler_step(latents, velocity, sigma: float, sigma_next: float):
    """One flow-matching Euler step ``x + (sigma_next - sigma) * v``.

    ``dt`` is rounded to float32 as diffusers computes it; the update runs in the arrays' own dtype,
    so pass float32 to update in float32. Written for numpy arrays and torch tensors alike (a Python
    float scalar keeps either library's dtype): the reference calls it on its tensors, so there is
    one formula, not a torch twin to keep equal.
    """
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    return latents + dt * velocity


def apply_guidance(cond, uncond, scale: float):
    """Plain classifier-free guidance as Qwen-Image 2.x uses it (no norm rescale); numpy or torch,
    computed in the arrays' dtype with the scale rounded to float32."""
    return uncond + float(np.float32(scale)) * (cond - uncond)


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise InputError(f"steps: expected a positive integer, got {num_steps!r}")
