"""Abuse of ``yolostream export`` and of ``--backend``: every bad argument is refused with exit 2 and one error
line naming it, before any heavy work where the arguments alone show the problem, and leaves no file behind."""

from __future__ import annotations

import pytest

from yolostream.server import cli


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    """``yolostream ARGS`` in this process: exit code (argparse's SystemExit included) and stderr's lines that are
    not warnings (random weights)."""
    try:
        code = cli.main(list(args))
    except SystemExit as err:
        code = err.code
    _, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]


@pytest.mark.parametrize("imgsz", ["0", "-1", "abc", "nan", "64,64,64", "64,0", "", "1.5"])
def test_a_bad_imgsz_is_an_argument_error(capsys, tmp_path, imgsz):
    code, lines = _run(capsys, "export", "--device", "cpu", "--imgsz", imgsz, "--out", str(tmp_path / "x.onnx"))
    assert code == 2
    assert lines[-1] == f"yolostream export: error: argument --imgsz: expected N or H,W (positive integers), " \
                        f"got {imgsz!r}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("export", "--dynamic", "bogus"), "argument --dynamic: invalid choice: 'bogus'"),
        (("export", "--format", "bogus"), "argument --format: invalid choice: 'bogus'"),
        (("export", "--format", "ONNX"), "argument --format: invalid choice: 'ONNX'"),
        (("serve", "--backend", "bogus"), "argument --backend: invalid choice: 'bogus'"),
        (("extract", "--backend", "bogus", "--out", "x", "in.png"), "argument --backend: invalid choice: 'bogus'"),
        (("extract", "--backend", "", "--out", "x", "in.png"), "argument --backend: invalid choice: ''"),
    ],
)
def test_bad_choices_exit_2_naming_the_argument(capsys, tmp_path, args, words):
    command = args[0]
    extra = ("--out", str(tmp_path / "x.onnx")) if command == "export" else ()
    code, lines = _run(capsys, *args, *extra)
    assert code == 2 and lines[-1].startswith(f"yolostream {command}: error: ") and words in lines[-1], lines
    assert list(tmp_path.iterdir()) == []


def _one_line(capsys, *args: str) -> str:
    code, lines = _run(capsys, "export", "--device", "cpu", *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("yolostream export: error: "), lines
    return lines[0]


def test_an_out_that_is_a_directory_is_refused_at_once(capsys, tmp_path):
    line = _one_line(capsys, "--imgsz", "64", "--out", str(tmp_path))
    assert f"--out {tmp_path} is a directory" in line
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_out_is_one_line_and_leaves_nothing(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = _one_line(capsys, "--imgsz", "64", "--layers", "P3", "--out", str(blocker / "sub" / "x.onnx"))
    assert "file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(("batch", "words"), [("0", "--batch must be at least 1, got 0"),
                                               ("-3", "--batch must be at least 1, got -3")])
def test_a_batch_below_1_is_refused(capsys, tmp_path, batch, words):
    assert words in _one_line(capsys, "--imgsz", "64", "--batch", batch, "--out", str(tmp_path / "x.onnx"))


def test_a_huge_layer_name_is_quoted_short(capsys, tmp_path):
    line = _one_line(capsys, "--imgsz", "64", "--layers", "y" * 50_000, "--out", str(tmp_path / "x.onnx"))
    assert "(50,000 characters)" in line and len(line) < 400
    assert list(tmp_path.iterdir()) == []


def test_auto_letterbox_with_a_fixed_shape_is_refused_before_loading(capsys, tmp_path):
    for dynamic in ((), ("--dynamic",), ("--dynamic", "batch")):
        line = _one_line(capsys, *dynamic, "--letterbox", "auto", "--out", str(tmp_path / "x.onnx"))
        assert "needs --dynamic shape" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "words"), [
    (["--imgsz", "4097"], "over the largest input size, 4096 per side"),
    (["--imgsz", "64,100000"], "over the largest input size, 4096 per side"),
    (["--imgsz", "4096", "--batch", "6"], "is an input of over 268,435,456 values"),
])
def test_export_refuses_inputs_too_large_to_check_before_loading_anything(capsys, tmp_path, args, words):
    code, lines = _run(capsys, "export", "--device", "cpu", "--out", str(tmp_path / "m.onnx"), *args)
    assert code == 2 and words in lines[-1], lines
    assert list(tmp_path.iterdir()) == []
