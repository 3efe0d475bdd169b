"""Bad checkpoints, model names, devices and output paths: one clear line and exit 2, never a
traceback, never a download, never an unpickle."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipguard.cli import main
from clipguard.errors import ClipguardError, ConfigError, DataError, OutputError
from clipguard.io import append_jsonl, atomic_dir, round_floats, write_json, write_text
from clipguard.models import checkpoint as ckpt
from clipguard.models import create_model, resolve_device, save_checkpoint
from clipguard.models.factory import list_models, model_config, needs_download

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download (open_clip's helpers, or a raw socket) fails the test loudly."""
    def boom(*a, **k):
        raise AssertionError(f"network access attempted: {a[:2]}")

    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", boom)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """8 labelled 28x28 images, an unlabelled copy of the CSV beside classes.json and good checkpoints."""
    root = tmp_path_factory.mktemp("bad_models")
    rng = np.random.default_rng(0)
    rows, bare = ["filepath\ttitle\tlabel"], ["filepath\ttitle"]
    for i in range(8):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(p)
        cap = "a photo of a bag." if i % 2 else "a photo of a sandal."
        rows.append(f"{p}\t{cap}\t{i % 2}")
        bare.append(f"{p}\t{cap}")
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    (root / "nolabel.csv").write_text("\n".join(bare) + "\n")
    classes = {"classes": ["sandal", "bag"], "templates": ["a photo of a {}."]}
    (root / "classes.json").write_text(json.dumps(classes))
    good = root / "run" / "checkpoints" / "epoch_001"
    save_checkpoint(good, create_model("cg-nano", seed=0), state={"model": "cg-nano"}, model_name="cg-nano")
    ckpt.update_link(good.parent, good)
    tiny = root / "tiny_ck"
    save_checkpoint(tiny, create_model("cg-tiny", seed=0), state={"model": "cg-tiny"})
    return {"root": root, "csv": root / "test.csv", "good": good, "tiny": tiny,
            "weights": (good / "model.safetensors").read_bytes()}


def run_cli(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("clipguard ") and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


# ------------------------------------------------------------------------------------ checkpoints
def _folder_with(root: Path, name: str, weights: bytes | None = None, state: str | None = None,
                 extra: dict[str, bytes] | None = None) -> Path:
    d = root / name
    d.mkdir()
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    (d / "state.json").write_text(state if state is not None else json.dumps({"model": "cg-nano"}))
    for fname, data in (extra or {}).items():
        (d / fname).write_bytes(data)
    return d


def _torch_zip() -> bytes:
    with tempfile.TemporaryDirectory() as t:
        torch.save({"w": torch.zeros(2)}, Path(t) / "p.pt")
        return (Path(t) / "p.pt").read_bytes()


CASES = {
    # name: (builder(env, tmp) -> checkpoint path, message fragment, file the message must name)
    "zero-byte": (lambda e, t: _folder_with(t, "c", b""), "empty (0 bytes)", "model.safetensors"),
    "truncated": (lambda e, t: _folder_with(t, "c", e["weights"][: len(e["weights"]) // 2]),
                  "corrupt or truncated", "model.safetensors"),
    "truncated-header": (lambda e, t: _folder_with(t, "c", e["weights"][:6]), "corrupt or truncated",
                         "model.safetensors"),
    "garbage": (lambda e, t: _folder_with(t, "c", os.urandom(4096)), "corrupt or truncated", "model.safetensors"),
    "torch-zip-as-safetensors": (lambda e, t: _folder_with(t, "c", _torch_zip()), "PyTorch zip archive",
                                 "model.safetensors"),
    "pickle-as-safetensors": (lambda e, t: _folder_with(t, "c", pickle.dumps({"w": [1, 2]}, protocol=4)),
                              "Python pickle", "model.safetensors"),
    "pkl-file": (lambda e, t: _write(t / "weights.pkl", _torch_zip()), "weights are read from .safetensors",
                 "weights.pkl"),  # .pt/.pth/.bin state dicts are read: tests/test_checkpoint_formats.py
    "only-bin-in-folder": (lambda e, t: _folder_with(t, "c", None, extra={"pytorch_model.bin": _torch_zip()}),
                           "only pickled weights", "pytorch_model.bin"),
    "corrupt-state": (lambda e, t: _folder_with(t, "c", e["weights"], state='{"model": "cg-na'),
                      "corrupt checkpoint state", "state.json"),
    "state-not-object": (lambda e, t: _folder_with(t, "c", e["weights"], state="[1, 2]"),
                         "not a JSON object", "state.json"),
    "missing": (lambda e, t: t / "nope", "checkpoint not found", "nope"),
    "run-with-orphans-only": (lambda e, t: _orphan_run(t), "no finished checkpoint", "run2"),
    "pretrained-tag": (lambda e, t: "laion2b_s34b_b79k", "open_clip pretrained tag", "laion2b_s34b_b79k"),
    "hf-hub-checkpoint": (lambda e, t: "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "never downloads",
                          "hf-hub:laion"),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _orphan_run(t: Path) -> Path:
    cdir = t / "run2" / "checkpoints"
    (cdir / ".epoch_001.abcd1234.cgtmp").mkdir(parents=True)
    (cdir / ".epoch_001.abcd1234.cgtmp" / "state.json").write_text("{}")
    return t / "run2"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_a_clear_error(case, env, tmp_path, capsys):
    build, needle, names = CASES[case]
    path = build(env, tmp_path)
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(path), "--data", str(env["csv"])])
    assert_clean_error(rc, err, needle, names)


def test_weights_of_another_architecture(env, capsys):
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["tiny"]), "--data", str(env["csv"]),
                                  "--model", "cg-nano"])
    assert_clean_error(rc, err, "another architecture", "model 'cg-nano'", "state.json says model 'cg-tiny'",
                       "shape mismatch", "visual.", str(env["tiny"] / "model.safetensors"))


def test_mismatch_names_missing_and_unexpected_keys(env):
    from safetensors.torch import load_file

    model = create_model("cg-nano")
    sd = load_file(str(env["good"] / "model.safetensors"))
    sd["extra.weight"] = sd.pop("logit_scale")
    with pytest.raises(ConfigError, match=r"missing keys: logit_scale; unexpected keys: extra\.weight"):
        ckpt.check_fits(model, sd, "x.safetensors", "cg-nano")


def test_good_checkpoint_still_evaluates(env, capsys):
    rc, out, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["root"] / "run"),
                                    "--data", str(env["csv"])])
    assert rc == 0, err
    assert json.loads(out)["zeroshot"]["n_images"] == 8


def test_corrupt_optimizer_tensors_name_the_file(tmp_path, env):
    (tmp_path / "optimizer.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(DataError, match="optimizer.safetensors.*corrupt or truncated"):
        ckpt.load_tensors(tmp_path, "optimizer")


def test_optimizer_state_of_another_model(tmp_path):
    a, b = create_model("cg-nano", seed=0), torch.nn.Linear(2, 2)
    opt_a = torch.optim.AdamW(a.parameters())
    a(torch.zeros(1, 3, 28, 28), torch.zeros(1, 20, dtype=torch.long))[0].sum().backward()
    opt_a.step()
    t, meta = ckpt.optimizer_to_tensors(opt_a)
    with pytest.raises(ConfigError, match="optimizer state does not fit"):
        ckpt.optimizer_from_tensors(torch.optim.AdamW(b.parameters()), t, meta)


# ------------------------------------------------------------------- orphans of an interrupted save
def test_resolve_latest_ignores_orphans_and_clean_orphans_removes_only_them(env, tmp_path):
    cdir = tmp_path / "checkpoints"
    cdir.mkdir()
    good = cdir / "epoch_001"
    save_checkpoint(good, create_model("cg-nano", seed=0), state={"model": "cg-nano", "epoch": 0})
    orphans = [".epoch_002.k2j4x9a1.cgtmp", ".epoch_001.old.cgtmp", ".epoch_002.k2j4_x9a", ".epoch_003.old"]
    for name in orphans:  # complete-looking folders: an interruption can come after every file
        (cdir / name).mkdir()
        (cdir / name / "state.json").write_text("{}")
        (cdir / name / "model.safetensors").write_bytes(env["weights"])
    (cdir / ".latest.cgtmp").write_text("epoch_002")
    (cdir / "epoch_002").mkdir()  # a folder without state: not finished
    (cdir / "latest").write_text(".epoch_002.k2j4x9a1.cgtmp")
    keep = [".my_notes", "epoch_002", "notes.txt", "latest", "epoch_001"]
    (cdir / ".my_notes").write_text("mine")
    (cdir / "notes.txt").write_text("mine")

    assert ckpt.resolve_latest(cdir) == good
    removed = ckpt.clean_orphans(cdir)
    assert sorted(p.name for p in removed) == sorted(orphans + [".latest.cgtmp"])
    assert sorted(p.name for p in cdir.iterdir()) == sorted(keep)
    assert ckpt.clean_orphans(cdir) == [] and ckpt.clean_orphans(tmp_path / "none") == []


def test_resolve_latest_is_numeric_and_survives_a_garbage_link(env, tmp_path):
    cdir = tmp_path / "checkpoints"
    for n in (999, 1000):
        d = cdir / f"epoch_{n}"
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
        (d / "model.safetensors").write_bytes(env["weights"])
    (cdir / "latest").write_bytes(b"\xff\xfe../../etc")
    assert ckpt.resolve_latest(cdir) == cdir / "epoch_1000"
    ckpt.prune(cdir, keep=1)
    assert [p.name for p in cdir.glob("epoch_*")] == ["epoch_1000"]


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints" / "epoch_001"
    model = create_model("cg-nano", seed=0)
    save_checkpoint(folder, model, state={"model": "cg-nano", "epoch": 0})
    before = (folder / "model.safetensors").read_bytes()

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, create_model("cg-nano", seed=1), state={"model": "cg-nano", "epoch": 5})
    assert (folder / "model.safetensors").read_bytes() == before
    assert ckpt.read_state(folder)["epoch"] == 0
    assert [p.name for p in folder.parent.iterdir()] == ["epoch_001"]


# ------------------------------------------------------------------ model names: never a download
MODEL_CASES = {
    "hf-hub": ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "never downloads"),
    "hf-text-tower": ("roberta-ViT-B-32", "never downloads"),
    "hf-tokenizer": ("ViT-B-16-SigLIP", "never downloads"),
    "unknown": ("no-such-model", "unknown model"),
    "local-dir-missing": ("local-dir:/nonexistent/folder", "folder not found"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_names_that_would_download_are_refused(case, env, capsys):
    name, needle = MODEL_CASES[case]
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                  "--model", name])
    assert_clean_error(rc, err, needle, name)


def test_local_dir_with_pickled_weights_is_refused(tmp_path, env, capsys):
    d = tmp_path / "exported"
    d.mkdir()
    (d / "open_clip_config.json").write_text((env["good"] / "open_clip_config.json").read_text())
    (d / "open_clip_pytorch_model.bin").write_bytes(_torch_zip())
    with pytest.raises(ConfigError, match="only pickled weights.*pass the file itself"):
        create_model(f"local-dir:{d}")
    (d / "open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(DataError, match="open_clip_config.json.*model_cfg"):
        model_config(f"local-dir:{d}")


def test_open_clip_export_without_state_names_its_own_model(env, tmp_path, capsys):
    """A folder with open_clip_config.json and weights but no state.json is ``local-dir:FOLDER``."""
    d = tmp_path / "export"
    d.mkdir()
    os.link(env["good"] / "model.safetensors", d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text((env["good"] / "open_clip_config.json").read_text())
    rc, out, err = run_cli(capsys, ["evaluate", "--checkpoint", str(d), "--data", str(env["csv"])])
    assert rc == 0, err
    rc, out, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                    "--model", f"local-dir:{d}"])
    assert rc == 0, err


def test_pretrained_tags_are_refused_by_the_api():
    with pytest.raises(ConfigError, match="'openai' is an open_clip pretrained tag.*never downloads"):
        create_model("RN50", pretrained="openai")
    assert needs_download("roberta-ViT-B-32") and needs_download("cg-nano") is None
    offline = list_models()
    assert "cg-nano" in offline and "ViT-B-32" in offline and "roberta-ViT-B-32" not in offline
    assert "roberta-ViT-B-32" in list_models(include_download=True)


# ---------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device,needle", [("cuda", "--device cuda but no CUDA GPU is visible"),
                                           ("cuda:1", "--device cuda:1 but no CUDA GPU is visible"),
                                           ("tpu", "unknown device"), ("cuda:x", "unknown device")])
def test_bad_device_is_refused_up_front(device, needle, env, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                  "--device", device])
    assert_clean_error(rc, err, needle)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")


# ---------------------------------------------------------------------- evaluate: classes, labels
def test_missing_classes_file_is_an_error(env, capsys):
    missing = env["root"] / "nope_classes.json"
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                  "--classes", str(missing)])
    assert_clean_error(rc, err, "classes file not found", missing)


def test_data_without_labels_is_an_error_for_zero_shot(env, capsys):
    data = env["root"] / "nolabel.csv"
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(data)])
    assert_clean_error(rc, err, "no label column 'label'", data)
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                  "--probe-data", str(data), "--classes", str(env["root"] / "classes.json")])
    assert_clean_error(rc, err, "linear probe needs labelled data", data)
    # retrieval only, when asked for
    rc, out, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(data),
                                    "--csv-label-key", ""])
    assert rc == 0 and "zeroshot" not in json.loads(out), err


def test_labels_beyond_the_classes_are_an_error(env, tmp_path, capsys):
    (tmp_path / "one.json").write_text(json.dumps({"classes": ["sandal"]}))
    rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                  "--classes", str(tmp_path / "one.json")])
    assert_clean_error(rc, err, "label 1 is out of range", env["csv"])


# ---------------------------------------------------------------------------------- output paths
def _enospc(self, *a, **k):
    with open(self, "w") as f:
        f.write("half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


def _eacces(*a, **k):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))


OUT_FAULTS = ["existing-directory", "parent-is-a-file", "read-only", "disk-full"]


@pytest.mark.parametrize("fault", OUT_FAULTS)
@pytest.mark.parametrize("writer", ["write_json", "append_jsonl", "atomic_dir"])
def test_output_faults_name_the_path_and_keep_the_old_content(fault, writer, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    old = folder / "old.json"
    write_text(old, '{"x": 1}\n')
    if fault == "existing-directory":  # for atomic_dir the fault is the reverse: a file in the way
        path = old if writer == "atomic_dir" else folder / "new.json"
    elif fault == "parent-is-a-file":
        path = old / "sub" / "new.json"
    else:  # append to the old file; replace it with a folder
        path = old if writer == "append_jsonl" else folder / "new.json"
    with monkeypatch.context() as m:
        if fault == "existing-directory" and writer != "atomic_dir":
            path.mkdir()
        elif fault == "read-only":
            if os.geteuid() == 0:  # root writes anywhere: simulate the refusal
                m.setattr(tempfile, "mkstemp", _eacces)
                m.setattr(tempfile, "mkdtemp", _eacces)
            else:
                folder.chmod(0o555)
        elif fault == "disk-full":
            m.setattr(Path, "write_text", _enospc)
        with pytest.raises(OutputError) as exc:
            if writer == "write_json":
                write_json(path, {"y": 2})
            elif writer == "append_jsonl":
                append_jsonl(path, {"y": 2})
            else:
                with atomic_dir(path) as d:
                    (d / "f.txt").write_text("data")
    folder.chmod(0o755)
    assert f"cannot write {path}: " in str(exc.value) and isinstance(exc.value, ClipguardError)
    assert old.read_text() == '{"x": 1}\n'
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")], list(folder.rglob("*"))


@pytest.mark.parametrize("fault", OUT_FAULTS)
def test_evaluate_out_faults_are_one_line(fault, env, tmp_path, capsys, monkeypatch):
    prev = tmp_path / "res.json"
    prev.write_text("previous")
    target = prev
    with monkeypatch.context() as m:
        if fault == "existing-directory":
            target = tmp_path / "resdir"
            target.mkdir()
        elif fault == "parent-is-a-file":
            target = prev / "res.json"
        elif fault == "read-only":
            m.setattr(tempfile, "mkstemp", _eacces)
        else:
            m.setattr(Path, "write_text", _enospc)
        rc, _, err = run_cli(capsys, ["evaluate", "--checkpoint", str(env["good"]), "--data", str(env["csv"]),
                                      "--csv-label-key", "", "--out", str(target)])
    assert_clean_error(rc, err, f"cannot write {target}: ")
    assert prev.read_text() == "previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------- cli
@pytest.mark.parametrize("exc,rc,needle", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/x.json"), 2, "/srv/x.json: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/srv/out"), 2, "/srv/out: Is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/srv/f/x"), 2, "/srv/f/x: Not a directory"),
    (OSError(errno.ENOSPC, "No space left on device", "/srv/big"), 2, "/srv/big: No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_cli_turns_environment_errors_into_one_line(exc, rc, needle, monkeypatch, capsys):
    import clipguard.models.factory as factory

    def raises(*a, **k):
        raise exc

    monkeypatch.setattr(factory, "list_models", raises)
    got, _, err = run_cli(capsys, ["models"])
    assert got == rc and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_lets_real_bugs_show(monkeypatch):
    import clipguard.models.factory as factory

    def bug(*a, **k):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(factory, "list_models", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["models"])


def test_broken_pipe_in_process(monkeypatch):
    class Closed:
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["models"]) == 141


# The child writes one line, waits until `head -1` has gone (POLLERR on its stdout), then runs
# `clipguard models` into the closed pipe: deterministic, unlike a plain race with head.
PIPE_CHILD = r"""
import os, select, sys
os.write(1, b"first\n")
p = select.poll(); p.register(1, select.POLLERR); p.poll(20000)
from clipguard.cli import main
sys.exit(main(["models"]))
"""


def test_models_into_head_exits_quietly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CHILD": PIPE_CHILD}
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$CHILD" | head -1; echo "rc=${{PIPESTATUS[0]}}"'],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.stdout == "first\nrc=141\n", (r.stdout, r.stderr)
    assert r.stderr == "", r.stderr


# ------------------------------------------------------------------------------------- JSON floats
def test_round_floats():
    obj = {"acc": 0.6520000100135803, "lr": 3.1999999e-07, "n": 7, "ok": True, "name": "0.6520000100135803",
           "big": 1234567.891, "pct": 65.19999694824219, "neg": -0.1234567891, "zero": 0.0,
           "nested": [np.float32(0.652), torch.tensor(0.25), (1.0000001, 2)], "nan": float("nan"),
           "inf": [float("inf"), -math.inf], "arr": np.array([0.1, 0.2], dtype=np.float32)}
    r = round_floats(obj)
    assert r["acc"] == 0.652 and r["lr"] == 3.2e-07 and r["n"] == 7 and r["ok"] is True
    assert r["name"] == "0.6520000100135803" and r["big"] == 1234568.0 and r["pct"] == 65.2
    assert r["neg"] == -0.123457 and r["zero"] == 0.0
    assert r["nested"] == [0.652, 0.25, [1.0, 2]] and r["nan"] is None and r["inf"] == [None, None]
    assert r["arr"] == [0.1, 0.2] and type(r["n"]) is int
    assert round_floats(0.123456789, digits=3) == 0.123


def test_json_writers_round_and_stay_valid(tmp_path):
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))

    write_json(tmp_path / "m.json", {"acc": torch.tensor(0.652).item(), "loss": float("nan")})
    text = (tmp_path / "m.json").read_text()
    assert "0.652," in text and "0.6520000" not in text and strict(text) == {"acc": 0.652, "loss": None}
    append_jsonl(tmp_path / "r.jsonl", {"acc": np.float32(0.652)})
    append_jsonl(tmp_path / "r.jsonl", {"acc": float("inf")})
    assert [strict(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [
        {"acc": 0.652}, {"acc": None}]
    write_json(tmp_path / "raw.json", {"acc": 0.6520000100135803}, digits=None)
    assert "0.6520000100135803" in (tmp_path / "raw.json").read_text()
