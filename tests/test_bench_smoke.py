"""The benchmark suite at toy sizes: every section runs end to end and its results have the documented shape.

No timing is asserted: only that each section measures what it says, with every field a table or the JSON needs.
Nor does any assertion depend on the machine's speed: every measuring window waits for ``min_frames`` answers per
client, however long its toy duration.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import e2e_bench  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
from link_bench import Link  # noqa: E402
from shaped_link import CHUNK, DOWN, UP, ShapedLink  # noqa: E402
from transport_bench import TransportCase  # noqa: E402

TINY = dataclasses.replace(
    run.QUICK, name="smoke", imgsz=64, batches=(1, 2), repeats=1, warmup=0,
    e2e_streams=(2,), e2e_inputs=("jpeg",), e2e_outputs=(("backbone", "float32"),), backend_e2e_streams=(2,),
    e2e_warm_s=0.1, e2e_duration_s=0.4, max_in_flight=2,
    camera_streams=(1,), camera_rate=30.0, camera_warm_s=0.1, camera_duration_s=0.4,
    transport_cases=(TransportCase("tiny", "yolov5n", ("backbone",), imgsz=64),),
    transport_in_flight=(2,), transport_frontends=(2,), transport_warm_s=0.1, transport_duration_s=0.3,
    objects_imgsz=64, objects_repeats=1, min_frames=2,
    samehost_cases=(TransportCase("tiny", "yolov5n", ("backbone",), imgsz=64),), samehost_inputs=("strip",),
    samehost_in_flight=2, samehost_warm_s=0.2, samehost_duration_s=0.3, samehost_rounds=1, samehost_camera_hw=(96, 128),
    link_cfg="yolov5n", link_imgsz=64, links=(Link("8 Mbit/s", 8.0, 2.0),), link_layers=("P3,P4,P5",),
    link_modes=(("float16", None), ("uint8", "zstd")), link_warm_s=0.2, link_duration_s=0.4, link_min_frames=2,
    link_cost_rounds=2, link_quality_frames=1,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    return run.run_suite(TINY, run.SECTION_NAMES, out)


def test_engine_rows_cover_both_ways_every_batch_and_layer_set(results):
    rows = results["sections"]["engine"]
    server = {(r["layers"], r["batch"]) for r in rows if r["way"].startswith("server") and r["backend"] == "torch"}
    assert server == {(layers, b) for layers in ("backbone", "P3,P4,P5", "full (Detect)") for b in (1, 2)}
    seed = [r for r in rows if r["way"].startswith("seed")]
    assert {r["layers"] for r in seed} == {"backbone", "P3,P4,P5"} and all(r["batch"] == 1 for r in seed)
    for r in rows:
        assert r["model"] == "yolov5n" and r["input"] == "64x64" and len(r["runs_ms"]) == 1
        assert r["ms_batch"] > 0 and r["fps"] == pytest.approx(1000.0 * r["batch"] / r["ms_batch"])
        assert "flag" in r and (r["flag"] is None or r["flag"].startswith("⚠"))
    run_sets = {r["layers"]: set(r["layers_run"]) for r in rows if r["way"].startswith("server") and r["batch"] == 1}
    assert run_sets["backbone"] < run_sets["P3,P4,P5"] < run_sets["full (Detect)"]
    assert all(set(r["layers_run"]) == run_sets["full (Detect)"] for r in seed)


def test_engine_rows_slower_than_a_row_computing_more_are_flagged():
    def row(layers, layers_run, ms_frame, backend="torch", batch=1):
        return {"model": "m", "imgsz": 320, "input": "256x320", "device": "cpu", "backend": backend, "batch": batch,
                "way": "server: x", "layers": layers, "layers_run": layers_run, "ms_frame": ms_frame}

    rows = [row("backbone", [0, 1], 31.0), row("P3,P4,P5", [0, 1, 2], 20.0), row("full", [0, 1, 2, 3], 29.0),
            row("backbone", [0, 1], 30.0, batch=4), row("P3,P4,P5", [0, 1, 2], 40.0, backend="onnxruntime")]
    report.flag_inconsistent(rows)
    assert [r["flag"] is not None for r in rows] == [True, False, False, False, False]
    assert rows[0]["flag"] == "⚠ 1.6x the ms/frame of P3,P4,P5 (server), which computes all of its layers"
    assert "⚠" in report.section_markdown("engine", [{**r, "fps": 1.0} for r in rows]).splitlines()[4]


def test_e2e_rows_count_frames_and_relate_to_the_engine(results):
    rows = results["sections"]["e2e"]
    assert [(r["backend"], r["streams"], r["input"], r["layers"], r["dtype"]) for r in rows] == [
        ("torch", 2, "jpeg", "backbone", "float32"), ("onnxruntime", 2, "jpeg", "backbone", "float32")]
    for r in rows:
        assert r["frames"] > 0 and r["errors"] == 0 and len(r["per_client_frames"]) == 2
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert 1 <= r["mean_batch"] <= 2 * TINY.max_in_flight
        assert r["server_cpu_ms_per_frame"] > 0
        assert r["engine_batch"] in (1, 2) and r["ratio_vs_engine"] == pytest.approx(r["fps"] / r["engine_fps"])
        assert set(r["server_timings_ms"]) == {"queued", "preprocess", "compute", "encode"}
        assert r["decode_cap_fps"] == pytest.approx(results["decode"]["capacity_fps"])
        assert r["bound"] == ("decode" if r["decode_cap_fps"] < r["engine_fps"] else "engine")
    decode = results["decode"]
    assert decode["ms_per_frame"] > 0 and decode["frontends"] >= 1 and decode["decode_threads"] >= 1
    assert results["frames"]["raw"]["bytes"] == 640 * 480 * 3
    assert results["frames"]["jpeg"]["bytes"] < 200_000


def test_both_backends_are_timed_in_the_same_run_and_compared(results):
    """The onnxruntime engine rows (server way, batch 1 of the smoke preset) and e2e cell, each against torch's."""
    engine = [r for r in results["sections"]["engine"] if r["backend"] == "onnxruntime"]
    assert {(r["layers"], r["batch"]) for r in engine} == {("backbone", 1), ("P3,P4,P5", 1)}
    assert all(r["way"].endswith("onnxruntime") and r["ms_batch"] > 0 for r in engine)
    ratios = results["sections"]["backends"]
    assert [(r["what"], r["layers"], r["size"]) for r in ratios] == [
        ("engine yolov5n", "backbone", 1), ("engine yolov5n", "P3,P4,P5", 1), ("e2e jpeg", "backbone", 2)]
    for r in ratios:
        assert r["backend"] == "onnxruntime" and r["ratio"] == pytest.approx(r["backend_fps"] / r["torch_fps"])


def test_camera_rows_are_paced_and_compared_with_batch_one(results):
    (row,) = results["sections"]["camera"]
    assert row["streams"] == 1 and row["rate"] == 30.0
    assert row["fps"] <= 30.0 * 1.5
    assert row["p50_vs_engine"] == pytest.approx(row["p50_ms"] / row["engine_b1_ms"])


def test_transport_moves_the_same_bytes_three_ways(results):
    (row,) = results["sections"]["transport"]
    assert row["grpc_errors"] == 0 and row["reply_bytes"] > 256 * 2 * 2 * 4
    assert row["frontends"] == row["streams"] == 2
    assert set(row["server_cpu_ms_per_msg_by_role"]) == {"supervisor", "device", "frontends"}
    assert row["frontend_cpu_ms_per_msg"] > 0 and row["device_cpu_ms_per_msg"] > 0
    for way in ("grpc", "echo", "socket"):
        assert row[f"{way}_msgs_s"] > 0
        assert row[f"{way}_mb_s"] == pytest.approx(row[f"{way}_msgs_s"] * row["reply_bytes"] / 1e6)
    assert row["ratio"] == pytest.approx(row["grpc_mb_s"] / row["socket_mb_s"])


def test_results_file_and_tables(results, capsys):
    path = Path(results["path"])
    stored = json.loads(path.read_text())
    assert path.name.startswith(stored["machine"]["hostname"]) and path.suffix == ".json"
    objects = {"objects_nms", "objects_overhead"}  # backends: derived from engine and e2e
    samehost = {"samehost_camera", "samehost_targets"}
    link = {"link_cost", "link_targets", "link_quality"}
    assert set(stored["sections"]) == {*run.SECTION_NAMES, "backends"} - {"objects"} | objects | samehost | link
    assert stored["machine"]["preset"] == "smoke" and stored["machine"]["cpu_model"]
    table = report.section_markdown("e2e", stored["sections"]["e2e"])
    assert table.count("\n|") == 2 + len(stored["sections"]["e2e"])


def test_samehost_moves_the_same_replies_through_shared_memory_a_unix_socket_and_tcp(results):
    rows = results["sections"]["samehost"]
    assert [(r["input"], r["way"]) for r in rows] == [("strip", way) for way in ("shm", "uds", "tcp")]
    assert len({r["reply_bytes"] for r in rows}) == 1 and rows[0]["reply_bytes"] == 256 * 2 * 2 * 4
    for r in rows:
        assert r["errors"] == 0 and r["msgs_s"] > 0 and r["server_cpu_ms_per_msg"] > 0
        assert r["cpu_ms_per_msg"] == pytest.approx(r["server_cpu_ms_per_msg"] + r["client_cpu_ms_per_msg"])
        assert 0 < r["frontend_cpu_ms_per_msg"] + r["device_cpu_ms_per_msg"] <= r["server_cpu_ms_per_msg"] * 1.0001
    camera = results["sections"]["samehost_camera"]
    assert [r["way"] for r in camera] == ["shm", "uds", "tcp"]
    for r in camera:
        assert r["errors"] == 0 and r["model_input"] == "64x64" and r["msgs_s"] <= 30.0 * 1.5
        assert r["p50_vs_engine"] == pytest.approx(r["p50_ms"] / r["engine_b1_ms"])
    goals = results["sections"]["samehost_targets"]
    assert [g["limit"] for g in goals] == ["≤ 1", "≤ 1", "≥ 5", "≤ 1.3"]
    assert goals[0]["ratio"] == pytest.approx(rows[0]["cpu_ms_per_msg"] / rows[2]["cpu_ms_per_msg"])
    assert goals[1]["ratio"] == pytest.approx(rows[0]["frontend_client_cpu_ms_per_msg"]
                                              / rows[2]["frontend_client_cpu_ms_per_msg"])
    assert goals[2]["ratio"] == pytest.approx(rows[0]["msgs_s"] / rows[2]["msgs_s"])
    assert goals[3]["ratio"] == pytest.approx(camera[0]["p50_vs_engine"])
    meets = {"≤ 1": lambda x: x <= 1.0, "≥ 5": lambda x: x >= 5.0, "≤ 1.3": lambda x: x <= 1.3}
    assert all(g["met"] == meets[g["limit"]](g["ratio"]) for g in goals)


def test_link_rows_cover_every_link_and_mode_and_count_the_bytes_that_crossed(results):
    rows = results["sections"]["link"]
    assert [(r["link"], r["mode"]) for r in rows] == [(link, mode) for link in ("none", "8 Mbit/s")
                                                      for mode in ("float16", "uint8+zstd")]
    values = 64 * 8 * 8 + 128 * 4 * 4 + 256 * 2 * 2  # yolov5n's P3-P5 for a 64x64 input
    for r in rows:
        assert r["frames"] > 0 and r["errors"] == 0 and r["values_per_frame"] == values
        assert r["bits_per_value"] == pytest.approx(8 * r["down_bytes_per_frame"] / values)
        assert r["p50_ms"] <= r["p99_ms"] and r["bound"] in ("camera", "link", "CPU", "neither (load)")
        assert r["cpu_bound_fps"] == next(u["fps"] for u in rows if u["link"] == "none" and u["mode"] == r["mode"])
    plain, coded = rows[0], rows[1]
    # float16 replies carry 16 bits per value plus framing; the codes 8 (before zstd) plus 64 bits of scale and
    # offset per channel, which on these 2x2 to 8x8 maps is 10.7 bits per value in all
    assert plain["bits_per_value"] > 16 and coded["bits_per_value"] < plain["bits_per_value"]
    shaped = rows[2]
    assert shaped["link_bound_fps"] == pytest.approx(8e6 / (8 * shaped["down_bytes_per_frame"]))
    assert shaped["down_mbit_s"] == pytest.approx(8 * shaped["down_bytes_per_frame"] * shaped["frames"]
                                                  / shaped["duration_s"] / 1e6)
    assert [q["met"] for q in results["sections"]["link_quality"] if "bound on" in q["measure"]] == ["yes"] * 4
    costs = results["sections"]["link_cost"]
    assert [c["mode"] for c in costs] == ["float16", "uint8+zstd"] and all(c["rounds"] == 2 for c in costs)
    for c in costs:
        assert c["server_cpu_ms_per_frame"] > 0 and c["device_cpu_ms_per_frame"] + c["frontend_cpu_ms_per_frame"] \
            <= c["server_cpu_ms_per_frame"] * 1.0001
        assert c["vs_float16"] == pytest.approx(c["server_cpu_ms_per_frame"] / costs[0]["server_cpu_ms_per_frame"])
    goal = results["sections"]["link_targets"][-1]
    assert goal["limit"] == "≤ 1.10" and goal["ratio"] == costs[1]["vs_float16"]


def test_link_targets_read_the_rows():
    def row(link, layers, mode, fps, bound, cpu=10.0):
        return {"link": link, "layers": layers, "mode": mode, "fps": fps, "link_bound_fps": bound,
                "down_bytes_per_frame": 1000.0, "bound": "x", "server_cpu_ms_per_frame": cpu}

    from link_bench import targets
    rows = [row("100 Mbit/s", "P3,P4,P5", "float16", 5.0, 6.0), row("100 Mbit/s", "P3,P4,P5", "uint8+zstd", 5.0, 16.0),
            row("20 Mbit/s", "backbone", "uint8+zstd", 21.0, 25.0)]
    costs = [{"mode": mode, "rate": 3.0, "rounds": 3, "server_cpu_ms_per_frame": ms, "device_cpu_ms_per_frame": ms / 2,
              "frontend_cpu_ms_per_frame": ms / 4, "vs_float16": ms / 100.0}
             for mode, ms in (("float16", 100.0), ("uint8+zstd", 104.0))]
    goals = {g["goal"].split(":")[0]: g for g in targets(rows, costs)}
    assert goals["P3,P4,P5 at 100 Mbit/s, uint8+zstd"]["met"] == "on the link's bound (CPU-bound here)"
    assert goals["backbone at 20 Mbit/s, uint8+zstd"]["met"] == "yes"
    cost = goals["server CPU per frame, P3,P4,P5, uint8+zstd"]
    assert cost["ratio"] == pytest.approx(1.04) and cost["met"] == "yes"


def test_shaped_link_never_delivers_faster_than_its_rate():
    """Bytes cannot arrive before their time on the line: 256 KB at 8 Mbit/s take at least 0.25 s, however fast
    the machine (a slower one only takes longer), and the counts match what was sent."""
    import socket
    import threading

    sink = socket.create_server(("127.0.0.1", 0))
    got = []

    def drain():
        conn, _ = sink.accept()
        with conn:
            while data := conn.recv(65536):
                got.append(len(data))

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    link = ShapedLink(sink.getsockname(), 8.0, one_way_ms=1.0).start()
    try:
        payload = b"\0" * (256 * 1024)
        with socket.create_connection(("127.0.0.1", link.port)) as conn:
            started = time.perf_counter()
            conn.sendall(payload)
        thread.join(30)
        finished = time.perf_counter()
        assert sum(got) == len(payload)
        assert link.bytes_between(UP, started, finished) == len(payload) and link.bytes_between(DOWN, 0, finished) == 0
        last = link.lines[UP].times[-1]
        assert last - started >= (len(payload) - CHUNK) * 8 / 8e6
    finally:
        link.stop()
        sink.close()


def test_objects_rows_time_nms_and_each_mode_against_the_layers_alone(results):
    nms = results["sections"]["objects_nms"]
    assert [r["setting"] for r in nms] == ["default (conf 0.25), cpu", "conf 0.001, cpu", "multi_label, conf 0.25, cpu"]
    assert all(r["rows"] == 3 * (8 * 8 + 4 * 4 + 2 * 2) and r["ms"] > 0 and r["cpu_ms"] >= 0 for r in nms)
    overhead = results["sections"]["objects_overhead"]
    assert [r["mode"] for r in overhead] == ["layers (cpu)", "detect (cpu)", "detect+anchor (cpu)", "detect+roi (cpu)"]
    assert overhead[0]["extra_ms"] == 0 and all(r["boxes"] == overhead[0]["boxes"] for r in overhead)


def test_window_counts_only_frames_inside_it():
    out = {"sent": np.array([0.0, 1.0, 2.0, 3.0]), "received": np.array([0.5, 1.5, 2.5, 3.5]),
           "batch": np.array([1, 2, 3, 4]), "ok": np.array([True, True, False, True]), "reply_bytes": 10}
    window = e2e_bench.summarise([out], 1.0, 3.0, (5.0, 6.0))
    assert window.frames == 2 and window.errors == 1 and window.cpu_s == 1.0
    np.testing.assert_allclose(window.latencies_ms, [500.0, 500.0, 500.0])
    np.testing.assert_array_equal(window.batch_sizes, [2, 3])


def stub_worker(spec: tuple[float | None, int], window: e2e_bench.ClientWindow | None, prepared: object = None):
    """A ``run_clients`` worker without a server. ``spec``: (seconds each answer takes, None for never; answers
    after which it stops on its own, 0 for none)."""
    if window is None:
        return None
    delay_s, stop_after = spec
    sent, received = [], []
    while not window.closed(time.perf_counter()) and not (stop_after and len(received) >= stop_after):
        if delay_s is None:  # waits for the driver to close the window, answering nothing
            time.sleep(0.01)
            continue
        sent.append(time.perf_counter())
        time.sleep(delay_s)  # the answer's round trip: how long it takes does not change what the tests assert
        received.append(window.answered())
    n = len(received)
    return {"sent": np.asarray(sent), "received": np.asarray(received), "batch": np.ones(n), "ok": np.ones(n, bool),
            "reply_bytes": 1}


def test_window_waits_for_min_frames_from_every_client():
    """Answers far slower than the window's duration (zero): it stays open until each client has had three."""
    window = e2e_bench.run_clients(stub_worker, [(0.05, 0), (0.2, 0)], warm_s=0.0, duration_s=0.0, min_frames=3)
    assert len(window.per_client_frames) == 2 and min(window.per_client_frames) >= 3


def test_window_that_cannot_get_min_frames_fails_clearly():
    with pytest.raises(TimeoutError, match=r"lacks 1 answers per client \(answers per client: \[0\]\)"):
        e2e_bench.run_clients(stub_worker, [(None, 0)], warm_s=0.0, duration_s=0.0, min_frames=1,
                              window_timeout_s=0.2)
    with pytest.raises(RuntimeError, match=r"client\(s\) \[1\] ended their stream before having 3 answers"):
        e2e_bench.run_clients(stub_worker, [(0.01, 0), (0.01, 2)], warm_s=0.0, duration_s=0.0, min_frames=3)


def test_engine_reference_picks_the_nearest_measured_batch():
    rows = [{"way": "server: x", "layers": "backbone", "batch": b, "fps": 10.0 * b} for b in (1, 4, 16)]
    assert e2e_bench.engine_reference(rows, "backbone", 2.4)["batch"] == 1
    assert e2e_bench.engine_reference(rows, "backbone", 2.6)["batch"] == 4
    assert e2e_bench.engine_reference(rows, "P3,P4,P5", 4.0) is None


def test_presets_and_arguments():
    assert run.parse_args(["--quick", "--only", "e2e,transport"]).sections == ["e2e", "transport"]
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "nope"])
    assert run.QUICK.cfg == "yolov5n" and run.QUICK.imgsz == 320 and run.QUICK.device == "cpu"
    assert run.GPU.half and set(run.GPU.engine_models) == {"yolov5s", "yolov5l"}
    assert set(run.GPU.e2e_streams) == {1, 4, 8, 16}
    assert set(run.GPU.e2e_outputs) == {("backbone", "float16"), ("P3,P4,P5", "float32")}
