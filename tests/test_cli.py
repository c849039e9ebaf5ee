"""The qwen-image-edge command: dispatch, info numbers, error handling, lazy imports, README/CI."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_image_edge.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own exits (--help, --version, usage errors)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


# Qwen-Image-2.1 transformer, from the key shapes in qwen-image-architecture.md ("2.1 state_dict keys
# and shapes"): no biases; img_norm1/2 have no parameters.
D, LAYERS, HEAD_DIM, TIME_DIM, CONTEXT, LATENT = 4096, 32, 128, 256, 4096, 64
QWEN21_TRANSFORMER_PARAMS = (
    D * TIME_DIM + D * D  # time_text_embed.timestep_embedder.linear_1 / linear_2
    + CONTEXT  # txt_in.text_norm
    + D * CONTEXT + D * D  # txt_in.in_layer / out_layer
    + D * LATENT  # img_in
    + 4 * D * D  # modulation.1 (shared by all blocks)
    + D * D  # norm_out.linear
    + LATENT * D  # proj_out
    + LAYERS
    * (
        4 * D * D  # to_q, to_k, to_v, to_out.0
        + 2 * HEAD_DIM  # norm_q, norm_k
        + 3 * (3 * D * D)  # img_mlp.proj, gate_layer [3D, D]; out [D, 3D]
    )
)  # fmt: skip

# Qwen3-VL-8B text model (same document, section 3): GQA with q/k head norms, SwiGLU, RMSNorms, no biases.
V, H, T_LAYERS, HEADS, KV_HEADS, T_HEAD, FFN = 151936, 4096, 36, 32, 8, 128, 12288
QWEN3VL_TEXT_PARAMS = (
    V * H  # embed_tokens
    + T_LAYERS
    * (
        H * HEADS * T_HEAD + 2 * H * KV_HEADS * T_HEAD + HEADS * T_HEAD * H  # q, k, v, o
        + 2 * T_HEAD  # q_norm, k_norm
        + 3 * H * FFN  # gate, up, down
        + 2 * H  # input / post-attention RMSNorm
    )
    + H  # final norm
)  # fmt: skip
QWEN3VL_LM_HEAD_PARAMS = V * H  # tie_word_embeddings is false for the 8B
# Vision tower (depth 27, width 1152, MLP 4304, patch 16 x 16 x temporal 2, 2304 position embeddings,
# merge 2 -> 4 * 1152 features into 4096); unlike the text model it has biases and LayerNorms.
VH, VM, MH = 1152, 4304, 4 * 1152
QWEN3VL_VISION_PARAMS = (
    3 * 2 * 16 * 16 * VH + VH  # patch_embed Conv3d
    + 2304 * VH  # pos_embed
    + 27 * (2 * 2 * VH + VH * 3 * VH + 3 * VH + VH * VH + VH + VH * VM + VM + VM * VH + VH)  # blocks
    + 2 * VH + MH * MH + MH + MH * H + H  # merger: LayerNorm before the 2x2 shuffle, two linears
    + 3 * (2 * MH + MH * MH + MH + MH * H + H)  # deepstack mergers at 8, 16, 24: LayerNorm after it
)  # fmt: skip


def test_published_transformer_size_from_the_architecture_facts() -> None:
    # The reference document's own summary: about 7.115 B params, 14.23 GB in bf16.
    assert round(QWEN21_TRANSFORMER_PARAMS / 1e9, 3) == 7.115
    assert round(QWEN21_TRANSFORMER_PARAMS * 2 / 1e9, 2) == 14.23


def test_help_explains_the_stages(capsys) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for word in ("export", "quantize", "distill", "build", "run", "validate", "info"):
        assert word in out
    code, out, _ = run_cli(capsys, "info", "--help")
    assert code == 0 and "--preset" in out and "--json" in out


def test_version(capsys) -> None:
    from importlib.metadata import version

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"qwen-image-edge {version('qwen-image-edge')}"


def test_no_command_is_a_usage_error(capsys) -> None:
    code, _, err = run_cli(capsys)
    assert code == 2 and "COMMAND" in err


def test_info_qwen_image_21_json(capsys) -> None:
    code, out, err = run_cli(capsys, "info", "--preset", "qwen-image-2.1", "--json")
    assert code == 0, err
    data = json.loads(out)
    t, e = data["transformer"], data["encoder"]
    assert (t["layers"], t["heads"], t["head_dim"], t["hidden"]) == (32, 32, 128, 4096)
    assert t["params"] == QWEN21_TRANSFORMER_PARAMS
    assert t["bf16_gb"] == pytest.approx(QWEN21_TRANSFORMER_PARAMS * 2 / 1e9)
    assert e["text_params"] == QWEN3VL_TEXT_PARAMS
    assert e["vision_params"] == QWEN3VL_VISION_PARAMS
    assert e["lm_head_params"] == QWEN3VL_LM_HEAD_PARAMS
    assert e["params"] == QWEN3VL_TEXT_PARAMS + QWEN3VL_VISION_PARAMS + QWEN3VL_LM_HEAD_PARAMS
    assert data["vae"]["params"] == published_vae_params()
    assert data["params"] == t["params"] + data["vae"]["params"] + e["params"]


def published_vae_params() -> int:
    """diffusers' AutoencoderKLQwenImage21 with the published 2.1 config (architecture doc), on meta."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKLQwenImage21

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage21(
            base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2,
            is_residual=True, in_channels=4, out_channels=4, scale_factor_spatial=16,
        )  # fmt: skip
    return sum(p.numel() for p in vae.parameters())


def test_info_table_prints_the_numbers(capsys) -> None:
    code, out, _ = run_cli(capsys, "info", "--preset", "qwen-image-2.1")
    assert code == 0
    assert re.search(
        rf"^transformer\s+{QWEN21_TRANSFORMER_PARAMS:,}\s+14\.23 GB\s+32 layers, 32 heads x 128 = 4096$",
        out,
        re.M,
    )
    assert re.search(
        rf"^text encoder\s+{QWEN3VL_TEXT_PARAMS + QWEN3VL_VISION_PARAMS + QWEN3VL_LM_HEAD_PARAMS:,}\s",
        out,
        re.M,
    )
    assert out.splitlines()[0] == "preset qwen-image-2.1"


def test_info_tiny_matches_the_diffusers_peers(capsys) -> None:
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    from qwen_image2_ref.config import TINY

    def kwargs(cfg) -> dict:
        return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}

    with torch.device("meta"):
        peer_t = QwenImage21Transformer2DModel(**kwargs(TINY.transformer))
        peer_v = AutoencoderKLQwenImage21(**kwargs(TINY.vae))

    code, out, _ = run_cli(capsys, "info", "--preset", "tiny", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["preset"] == "tiny"
    assert data["transformer"]["params"] == sum(p.numel() for p in peer_t.parameters())
    assert data["vae"]["params"] == sum(p.numel() for p in peer_v.parameters())
    assert data["vae"]["encoder_params"] == sum(p.numel() for p in peer_v.encoder.parameters())
    assert data["vae"]["decoder_params"] == sum(p.numel() for p in peer_v.decoder.parameters())
    assert 0 < data["encoder"]["params"] < 1_000_000

    code, out, _ = run_cli(capsys, "info", "--preset", "tiny")
    assert code == 0 and re.search(rf"^transformer\s+{data['transformer']['params']:,}\s", out, re.M)


def test_unknown_preset_is_one_line_and_exit_2(capsys) -> None:
    code, out, err = run_cli(capsys, "info", "--preset", "no-such-model")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("qwen-image-edge: error: unknown preset 'no-such-model'")
    assert "qwen-image-2.1" in err  # says what was expected


def test_stage_errors_are_one_line_but_bugs_are_not_hidden(capsys, monkeypatch) -> None:
    import qwen_image2_ref.sizes as sizes
    from qwen_image_edge.runtime.errors import CheckpointError

    def broken(config):
        raise CheckpointError("transformer/config.json: expected a JSON object, got a list")

    monkeypatch.setattr(sizes, "model_sizes", broken)
    code, _, err = run_cli(capsys, "info", "--preset", "tiny")
    assert code == 2
    assert err == "qwen-image-edge: error: transformer/config.json: expected a JSON object, got a list\n"

    def bug(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sizes, "model_sizes", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "--preset", "tiny"])


def test_cli_import_and_help_load_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from qwen_image_edge import cli\n"
        "for argv in (['--help'], ['--version'], ['info', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "heavy = {'torch', 'numpy', 'transformers', 'diffusers', 'onnx', 'onnxruntime'} & set(sys.modules)\n"
        "print('HEAVY', sorted(heavy))\n"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_module_entry_point() -> None:
    proc = python("", "-m", "qwen_image_edge", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("qwen-image-edge ")
    proc = python("", "-m", "qwen_image_edge", "info", "--preset", "no-such-model")
    assert proc.returncode == 2 and proc.stderr.startswith("qwen-image-edge: error: unknown preset")


@pytest.mark.parametrize(
    ("flags", "level"), [((), logging.WARNING), (("-v",), logging.INFO), (("-vv",), logging.DEBUG)]
)
def test_verbose_sets_the_log_level(capsys, caplog, flags, level) -> None:
    root = logging.getLogger()
    saved = root.level
    try:
        code, _, _ = run_cli(capsys, *flags, "info", "--preset", "tiny")
        assert code == 0 and root.level == level
    finally:
        root.setLevel(saved)
    sizes_info = [
        r for r in caplog.records if r.name == "qwen_image2_ref.sizes" and r.levelno == logging.INFO
    ]
    assert bool(sizes_info) == (level <= logging.INFO)


# --- README and .ci/run ---------------------------------------------------------------------------------


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", text, re.S)
    assert match, f"README.md: no ```bash block after <!-- {marker} -->"
    return match.group(1)


def test_ci_runs_exactly_the_readme_commands() -> None:
    setup, test = readme_block("ci:setup"), readme_block("ci:test")
    assert test == ".venv/bin/python -m pytest -q && .venv/bin/python -m pytest -q -m mutation"
    assert setup.startswith("python -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]' && ")
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    lines = ci.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    assert "set -euo pipefail" in lines
    assert setup in lines and test in lines
    assert lines.index(setup) < lines.index(test)
    assert lines[-1] == test  # pytest's exit code is the script's


def test_readme_lists_exactly_the_commands_that_exist() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    text = (REPO / "README.md").read_text()
    listed = set(re.findall(r"^\| `qwen-image-edge (\w[\w-]*)", text, re.M))
    assert listed == set(subparsers.choices)
