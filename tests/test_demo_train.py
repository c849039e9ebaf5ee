"""The demo trainer: reproducible, resumable bit for bit after an interruption in any stage, and its
checkpoints survive a kill mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qwen_image2_ref.demo import resume, train, train_dit, train_encoder, train_vae
from qwen_image_edge.runtime.errors import CheckpointError, ConfigError

STEPS = 4
TENSOR_FILES = ("vae", "encoder", "dit", "ckpt_vae", "ckpt_encoder", "ckpt_dit")


def _args(out, seed=0, stages="vae,encoder,data,dit", *extra):
    return ["--out", str(out), "--seed", str(seed), "--stages", stages, "--vae-steps", str(STEPS),
            "--encoder-steps", str(STEPS), "--dit-steps", str(STEPS), "--small-data", "--no-progress",
            "--threads", "1", *extra]


def _stop_at(monkeypatch, stage: str, step: int, by_signal: bool = False) -> None:
    """Make ``stage`` stop after ``step`` steps, as a SIGTERM (the CLI's handler) or ``STOP`` would."""
    real = resume.run_steps

    def run_steps(state, step_fn, *args, **kwargs):
        def fn(st):
            loss = step_fn(st)
            if args[2] == stage and st.step + 1 == step:  # args: path, every_s, desc, ...
                os.kill(os.getpid(), signal.SIGTERM) if by_signal else resume.STOP.set()
            return loss
        return real(state, fn, *args, **kwargs)

    for module in (train_vae, train_encoder, train_dit):
        monkeypatch.setattr(module, "run_steps", run_steps)


def _tensors(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in TENSOR_FILES:
        found, _ = resume.read_checkpoint(out / f"{name}.safetensors") if name.startswith("ckpt") else (
            train_dit.load_stage(out / name))
        tensors.update({f"{name}:{k}": v for k, v in found.items()})
    return tensors


def test_trainer_resumes_bit_exact_after_interruptions_in_every_stage(tmp_path, monkeypatch):
    straight = train.main(_args(tmp_path / "a"))
    out = tmp_path / "b"
    _stop_at(monkeypatch, "vae", 2, by_signal=True)
    with pytest.raises(SystemExit) as stopped:
        train.cli(_args(out))
    assert stopped.value.code == 3
    assert resume.read_checkpoint(out / "ckpt_vae.safetensors")[1]["step"] == 2
    with pytest.raises(ConfigError, match="--resume"):  # never silently restarts over a checkpoint
        train.main(_args(out))
    _stop_at(monkeypatch, "encoder", 1)
    with pytest.raises(resume.Interrupted):
        train.main(_args(out, 0, "vae,encoder,data,dit", "--resume"))
    # a SIGTERM outside a training loop (rendering and encoding the data) stops at once, writing nothing
    real_build = train_dit.build_data

    def build_data(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(train_dit, "build_data", build_data)
    with pytest.raises(SystemExit) as stopped:
        train.cli(_args(out, 0, "vae,encoder,data,dit", "--resume"))
    assert stopped.value.code == 3 and not (out / "data.json").exists()
    monkeypatch.setattr(train_dit, "build_data", real_build)
    _stop_at(monkeypatch, "dit", 3)
    with pytest.raises(resume.Interrupted):
        train.main(_args(out, 0, "vae,encoder,data,dit", "--resume"))
    monkeypatch.undo()
    # mid-run, the dit stage file (what `--stages save` writes a folder from) is the checkpoint's EMA
    ckpt, meta = resume.read_checkpoint(out / "ckpt_dit.safetensors")
    ema = {k[len("ema/"):]: v for k, v in ckpt.items() if k.startswith("ema/")}
    stage_file, stage_meta = train_dit.load_stage(out / "dit")
    assert meta["step"] == 3 and stage_meta["step"] == 3 and ema.keys() == stage_file.keys()
    assert all(torch.equal(ema[k], stage_file[k]) for k in ema)
    resumed = train.main(_args(out, 0, "vae,encoder,data,dit", "--resume"))
    assert list(resumed) == ["dit", "timings_s"]  # the stages finished before were skipped
    assert resumed["dit"]["losses"] == straight["dit"]["losses"] and len(straight["dit"]["losses"]) == STEPS
    a, b = _tensors(tmp_path / "a"), _tensors(out)
    assert a.keys() == b.keys() and any(k.startswith("ckpt_dit:optimizer/") for k in a)
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]


def test_trainer_seed_changes_the_run_and_save_writes_a_loadable_folder(tmp_path):
    from qwen_image2_ref.model_folder import load_model

    a = train.main(_args(tmp_path / "a", 0, "vae,encoder"))
    c = train.main(_args(tmp_path / "c", 1, "vae,encoder,data,dit,save"))
    assert c["vae"]["losses"] != a["vae"]["losses"] and c["encoder"]["losses"] != a["encoder"]["losses"]
    assert all(np.isfinite(c["vae"]["losses"] + c["encoder"]["losses"] + c["dit"]["losses"]))
    assert not list((tmp_path / "c").rglob("*.pt"))  # safetensors + json, never pickle
    assert load_model(tmp_path / "c" / "weights").config.transformer == load_model("demo").config.transformer
    index = json.loads((tmp_path / "c" / "weights" / "model_index.json").read_text())
    assert index["qwen_image_edge"][train_dit.CAPTION_STYLE_KEY] == "v2"  # the language it learned
    assert index["qwen_image_edge"][train_dit.DIT_STEP_KEY] == len(c["dit"]["losses"])  # and how far


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    tmp_path.joinpath("train.lock").touch()
    with open(tmp_path / "train.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running trainer holds it
        with pytest.raises(SystemExit, match="another trainer is running"):
            train.main(_args(tmp_path, 0, "vae"))
        assert not (tmp_path / "ckpt_vae.safetensors").exists()


def _state(seed: int, steps: int = 3) -> resume.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return resume.TrainState({"model": model}, torch.optim.AdamW(model.parameters(), lr=0.1),
                             np.random.default_rng(seed), torch.Generator().manual_seed(seed), steps, {"lr": 0.1})


def _linear_step(st: resume.TrainState) -> float:
    model = st.modules["model"]
    x = torch.from_numpy(st.rng.standard_normal((8, 4)).astype(np.float32)) + torch.randn(8, 4, generator=st.gen)
    loss = model(x).square().mean()
    st.optimizer.zero_grad()
    loss.backward()
    st.optimizer.step()
    return loss.item()


def test_resume_refuses_changed_settings_and_resumes_done_runs_without_stepping(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    done = _state(0)
    resume.run_steps(done, _linear_step, path, 1e9, "t", progress=False)
    again = _state(5)
    assert resume.start(again, path, resume=True) is True and again.step == 3
    assert torch.equal(again.modules["model"].weight, done.modules["model"].weight)
    changed = _state(0)
    changed.settings = {"lr": 0.2}
    with pytest.raises(ConfigError, match=r"lr.*0\.1, 0\.2"):
        resume.start(changed, path, resume=True)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])  # what an in-place write killed near its end leaves
    with pytest.raises(CheckpointError, match="complete"):
        resume.read_checkpoint(cut)


_WRITER = """
import sys, numpy as np, torch
from pathlib import Path
from qwen_image2_ref.demo import resume
torch.manual_seed(0)
model = torch.nn.Linear(1024, 2048)  # 8 MB of weights, 24 MB with the optimizer: writes take a while
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 1024)).sum().backward()
opt.step()
state = resume.TrainState({"model": model}, opt, np.random.default_rng(0), torch.Generator(), 10**9, {})
while True:
    state.step += 1
    print(f"saving {state.step}", flush=True)
    resume.save_checkpoint(Path(sys.argv[1]), state)
"""


def test_a_kept_run_state_resumes_bit_exact_without_the_data_and_the_early_checkpoints(tmp_path, monkeypatch):
    """What qwen_image2_ref/demo/train_state/ keeps of a run between sittings (the tokenizer, the vae
    and encoder stage files and the dit checkpoint; not the 0.8 GB data stage nor the vae and encoder
    checkpoints):
    --resume skips the vae and encoder stages, renders the data again and continues the dit stage
    exactly where it stopped."""
    import shutil

    straight = train.main(_args(tmp_path / "a"))
    run = tmp_path / "b"
    _stop_at(monkeypatch, "dit", 2)
    with pytest.raises(resume.Interrupted):
        train.main(_args(run))
    monkeypatch.undo()
    kept = tmp_path / "kept"
    shutil.copytree(run / "tokenizer", kept / "tokenizer")
    for name in ("vae.safetensors", "vae.json", "encoder.safetensors", "encoder.json", "ckpt_dit.safetensors"):
        shutil.copy(run / name, kept / name)
    resumed = train.main(_args(kept, 0, "vae,encoder,data,dit", "--resume"))
    assert list(resumed) == ["data", "dit", "timings_s"]  # vae and encoder skipped, data rendered again
    assert resumed["dit"]["losses"] == straight["dit"]["losses"]
    a, b = train_dit.load_stage(tmp_path / "a" / "dit")[0], train_dit.load_stage(kept / "dit")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a dit stage file without its checkpoint is a mid-run snapshot, never taken as a finished stage
    (kept / "ckpt_dit.safetensors").unlink()
    assert train.stage_done(kept, "vae") and train.stage_done(kept, "encoder")
    assert not train.stage_done(kept, "dit")


def test_a_kill_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path, tmp = tmp_path / "ckpt.safetensors", tmp_path / "ckpt.safetensors.tmp"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving 1"
        assert proc.stdout.readline().strip() == "saving 2"  # checkpoint 1 is complete
        before, deadline = path.stat().st_mtime_ns, time.time() + 10
        # kill as soon as checkpoint 2 is being written: a temp file appeared, or the file itself changed
        while not tmp.exists() and path.stat().st_mtime_ns == before and time.time() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, meta = resume.read_checkpoint(path)  # whole, whatever moment the kill came
        assert meta["step"] in (1, 2)
        if tmp.exists():  # the kill did land mid-write
            return
    pytest.fail("no kill landed mid-write in 3 tries (the writer is too fast for this test)")


def test_device_without_cuda_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--device cuda: this machine has no CUDA device"):
        train.main(["--out", str(tmp_path), "--device", "cuda", "--stages", "dit"])
    with pytest.raises(SystemExit, match=r"--device: expected cpu, cuda or cuda:N, got 'gpu'"):
        train.main(["--out", str(tmp_path), "--device", "gpu", "--stages", "dit"])


def _link_stages(src, dst) -> None:
    """A new work folder sharing ``src``'s finished vae, encoder and data stages."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name.split(".")[0] in ("vae", "encoder", "data", "tokenizer", "ckpt_vae", "ckpt_encoder"):
            (dst / p.name).symlink_to(p.resolve())


def test_a_branch_continues_its_parent_bit_for_bit_and_then_resumes_as_itself(tmp_path, monkeypatch):
    a = tmp_path / "a"
    _stop_at(monkeypatch, "dit", 2)
    with pytest.raises(resume.Interrupted):
        train.main(_args(a))
    monkeypatch.undo()
    parent = tmp_path / "parent.safetensors"
    parent.write_bytes((a / "ckpt_dit.safetensors").read_bytes())
    straight = train.main(_args(a, 0, "vae,encoder,data,dit", "--resume"))["dit"]["losses"]
    # the same options from the branch point: exactly the parent's own continuation
    b = tmp_path / "b"
    _link_stages(a, b)
    assert train.main(_args(b, 0, "dit", "--branch-from", str(parent)))["dit"]["losses"] == straight
    ca, cb = (resume.read_checkpoint(d / "ckpt_dit.safetensors") for d in (a, b))
    assert ca[0].keys() == cb[0].keys() and all(torch.equal(ca[0][k], cb[0][k]) for k in ca[0])
    assert cb[1]["settings"]["branched_from"] == {"path": str(parent), "step": 2, "settings": ca[1]["settings"]}
    # with other options: the parent's first steps, then its own run, which stops and resumes bit for bit
    weighted = ("--branch-from", str(parent), "--edit-weight", "recolor/2=4", "--edit-weight", "move=0.5")
    c, d = tmp_path / "c", tmp_path / "d"
    _link_stages(a, c)
    _link_stages(a, d)
    whole = train.main(_args(c, 0, "dit", *weighted))["dit"]["losses"]
    assert whole[:2] == straight[:2] and len(whole) == STEPS
    _stop_at(monkeypatch, "dit", 3)
    with pytest.raises(resume.Interrupted):
        train.main(_args(d, 0, "dit", *weighted))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="edit_weights"):  # a resume still needs the same options
        train.main(_args(d, 0, "dit", "--resume"))
    assert train.main(_args(d, 0, "dit", "--resume", *weighted))["dit"]["losses"] == whole
    meta = resume.read_checkpoint(d / "ckpt_dit.safetensors")[1]
    assert meta["settings"]["edit_weights"] == {"move": 0.5, "recolor/2": 4.0}
    assert meta["settings"]["branched_from"]["step"] == 2


def test_edit_weights_scale_the_draw_of_the_labelled_edits():
    edits = train_dit.train_edits(0, 300)
    assert train_dit.train_edits(0, 24) == edits[:24]  # the small data's edits are the same stream
    labels = [train_dit.edit_label(e) for e in edits]
    p = train_dit.edit_probabilities(0, 300, {"recolor/2": 4.0, "move": 0.5})
    base = p[labels.index("remove_object/2")]
    for label, q in zip(labels, p):
        want = 4.0 if label == "recolor/2" else 0.5 if label.startswith("move/") else 1.0
        assert q == pytest.approx(want * base, rel=1e-12), label
    assert p.sum() == pytest.approx(1.0) and 20 < labels.count("recolor/2") < 80


def test_the_dit_step_draws_edits_by_their_weights(tmp_path, monkeypatch):
    from qwen_image2_ref.config import DEMO

    train.main(_args(tmp_path, 0, "vae,encoder,data"))
    groups, _ = train_dit.load_groups(tmp_path / "data", train_dit.Group)
    labels = [train_dit.edit_label(e) for e in train_dit.train_edits(0, len(groups["edit_128"].latents))]
    assert 0 < labels.count("recolor/2") < len(labels) / 2
    drawn = []

    def flow_loss(model, group, idx, *args, **kwargs):  # record the edit draws; a cheap loss
        if group is groups["edit_128"]:
            drawn.extend(labels[i] for i in idx)
        return sum(p.sum() for p in model.parameters()) * 0.0

    monkeypatch.setattr(train_dit, "flow_loss", flow_loss)
    shares = []
    for weights in (None, {"recolor/2": 1000.0}):
        drawn.clear()
        train_dit.train_dit(DEMO, groups, train_dit.DiTSettings(steps=60, batch=4), 0, progress=False,
                            edit_weights=weights)
        assert len(drawn) >= 20
        shares.append(drawn.count("recolor/2") / len(drawn))
    assert shares[0] < 0.5 and shares[1] > 0.9, shares


def test_kept_object_tokens_are_the_block_of_the_object_the_edit_leaves_as_it_was():
    from qwen_image2_ref.demo import data

    edits = train_dit.train_edits(0, 200)
    mask = train_dit.kept_object_tokens(0, 200, (8, 8))
    assert mask.shape == (200, 64) and mask.dtype == bool
    seen = set()
    for ex, m in zip(edits, mask):
        label = train_dit.edit_label(ex)
        if ex.kind in ("move", "recolor") and len(ex.source.objects) == 1:
            assert not m.any(), label  # the only object changes: nothing is kept
            continue
        if label not in ("recolor/2", "remove_object/2"):
            continue
        seen.add(label)
        named = [o for o in ex.source.objects if o not in ex.target.objects]
        other = [o for o in ex.source.objects if o in ex.target.objects]
        assert len(named) == 1 and len(other) == 1, ex
        for o, want in ((other[0], True), (named[0], False)):  # the token under each object's centre
            x, y = data.slot_center(o.position, 128, 128)
            token = int((y + o.dy) // 16) * 8 + int((x + o.dx) // 16)
            assert m[token] == want, (label, o, m.reshape(8, 8).astype(int))
        assert 6 <= m.sum() <= 24  # an object of radius 26-34 px covers a few 16-px blocks, not half the image
    assert seen == {"recolor/2", "remove_object/2"}


def test_the_flow_loss_weighs_tokens_by_the_token_weight(tmp_path):
    from qwen_image2_ref.config import DEMO

    train.main(_args(tmp_path, 0, "vae,encoder,data"))
    groups, _ = train_dit.load_groups(tmp_path / "data", train_dit.Group)
    g = groups["edit_128"]
    torch.manual_seed(0)
    model = train_dit.QwenImageTransformer(DEMO.transformer).eval()
    idx, drop, variant = np.array([0, 3]), np.zeros(2, bool), np.zeros(2, np.int64)

    def loss(weight):
        with torch.no_grad():
            return float(train_dit.flow_loss(model, g, idx, drop, variant, torch.Generator().manual_seed(5),
                                             DEMO.transformer, token_weight=weight))

    n = g.latents.shape[1]
    plain = loss(None)
    assert loss(torch.full((2, n), 3.0)) == pytest.approx(plain, rel=1e-6)  # the scale of the weights cancels
    # weight only on half the tokens: the mean over that half; the two halves average to the plain loss
    first = torch.zeros(2, n)
    first[:, : n // 2] = 1.0
    a, b = loss(first), loss(1.0 - first)
    assert a != pytest.approx(b, rel=1e-3)
    assert (a + b) / 2 == pytest.approx(plain, rel=1e-5)


def test_the_kept_object_weight_changes_training_and_a_resume_needs_it_again(tmp_path, monkeypatch):
    more = ("--dit-steps", "12")  # 12 steps draw edit batches (30% of the steps; seed 0 draws some)
    kept = ("--edit-kept-weight", "4")
    plain = train.main(_args(tmp_path / "a", 0, "vae,encoder,data,dit", *more))["dit"]["losses"]
    b = tmp_path / "b"
    _link_stages(tmp_path / "a", b)
    weighted = train.main(_args(b, 0, "dit", *more, *kept))["dit"]["losses"]
    assert len(weighted) == len(plain) == 12
    assert weighted != plain
    first = next(i for i, (p, w) in enumerate(zip(plain, weighted)) if p != w)
    assert weighted[:first] == plain[:first]  # text-to-image batches are not weighted
    meta = resume.read_checkpoint(b / "ckpt_dit.safetensors")[1]
    assert meta["settings"]["edit_kept_weight"] == 4.0
    c = tmp_path / "c"
    _link_stages(tmp_path / "a", c)
    _stop_at(monkeypatch, "dit", 2)
    with pytest.raises(resume.Interrupted):
        train.main(_args(c, 0, "dit", *more, *kept))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="edit_kept_weight"):
        train.main(_args(c, 0, "dit", "--resume", *more))
    assert train.main(_args(c, 0, "dit", "--resume", *more, *kept))["dit"]["losses"] == weighted


@pytest.mark.parametrize("flag,message", [
    (("--edit-weight", "recolour/2=4"), r"unknown \['recolour/2'\]"),
    (("--edit-weight", "recolor/2"), "expected KIND"),
    (("--edit-weight", "recolor=-1"), "positive finite"),
    (("--branch-from", "nowhere.safetensors"), "no such checkpoint file"),
    (("--edit-kept-weight", "0"), "kept-object weight: expected a positive finite number"),
    (("--edit-kept-weight", "nan"), "kept-object weight"),
    (("--encoder-init", "nowhere"), "no encoder stage there"),
])
def test_bad_branch_and_edit_weight_options_are_refused_before_anything_runs(tmp_path, flag, message):
    with pytest.raises(SystemExit, match=message):
        train.main(_args(tmp_path / "x", 0, "vae", *flag))
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_the_encoder_stage_starts_from_another_runs_encoder_and_resumes_bit_exact(tmp_path, monkeypatch, capsys):
    """--encoder-init loads the parent's encoder stage, then trains (here with the edit readout, whose
    head and the vision tower join the checkpoint) and resumes bit for bit; a parent with another
    tokenizer is refused in one line."""
    parent = tmp_path / "parent"
    train.main(_args(parent, 0, "vae,encoder"))
    flags = ("--encoder-init", str(parent), "--encoder-edit-loss", "1", "--encoder-lr", "1e-3")
    straight = train.main(_args(tmp_path / "a", 0, "vae,encoder", *flags))["encoder"]
    out = tmp_path / "b"
    _stop_at(monkeypatch, "encoder", 2)
    with pytest.raises(resume.Interrupted):
        train.main(_args(out, 0, "vae,encoder", *flags))
    monkeypatch.undo()
    resumed = train.main(_args(out, 0, "vae,encoder", *flags, "--resume"))["encoder"]
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == STEPS
    a, b = resume.read_checkpoint(tmp_path / "a" / "ckpt_encoder.safetensors"), resume.read_checkpoint(
        out / "ckpt_encoder.safetensors")
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert any(k.startswith("edit_head/") for k in a[0])
    settings = a[1]["settings"]
    assert settings["edit_loss"] == 1.0 and settings["lr"] == 1e-3 and settings["init_from"]["path"] == str(parent)
    # the first step started from the parent's weights: a run without --encoder-init has other losses
    fresh = train.main(_args(tmp_path / "c", 0, "vae,encoder", *flags[2:]))["encoder"]
    assert fresh["losses"][0] != straight["losses"][0]
    # bench/encoder_grounding.py reads the checkpoint's edit readout; a run without one is refused
    from bench import encoder_grounding

    capsys.readouterr()
    encoder_grounding.main(["--work", str(out), "--n", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 2 * len(encoder_grounding.ROWS) and all(r[2] == "3" for r in rows)
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[3:])
    with pytest.raises(SystemExit, match="without --encoder-edit-loss"):
        encoder_grounding.main(["--work", str(parent), "--n", "3"])
    other = tmp_path / "other"
    train.main(_args(other, 1, "vae,encoder"))  # seed 1: another tokenizer
    with pytest.raises(SystemExit, match=r"^error: --encoder-init .*tokenizer differs"):
        train.cli(_args(tmp_path / "d", 0, "vae,encoder", "--encoder-init", str(other)))
