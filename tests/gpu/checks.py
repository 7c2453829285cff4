"""The Python steps of ``tests/gpu/run.sh`` (the GPU acceptance script): one subcommand each.

    python checks.py link-site VENV_PYTHON          this interpreter's packages into a venv
    python checks.py env --mode gpu|cpu             run-time imports, versions, the card
    [mpiexec -n 2] python checks.py staging --device cuda|cpu
    python checks.py results RUN.h5 --clients N --epochs E --device D [--baseline F.h5]
    python checks.py bench transport|train BENCH.json --device D
    python checks.py summary --work DIR --out DIR --mode gpu|cpu

A check exits 0 when it passed and writes what it measured as JSON to ``--figures FILE``
(``{"text": one line for the summary table, "figures": {...}}``); ``summary`` turns the
script's record of checks (``WORK/checks.tsv``) and those files into ``summary.md`` and
``summary.json``. Nothing is imported at the top but the standard library: ``link-site``,
``env`` and ``summary`` must run where torch, mpi4py or splitmpi are missing.

The CPU mode runs the same code as the GPU mode with ``--device cpu``; the one difference
is that staging is forced on CPU tensors the way ``tests/test_transport.py`` forces it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What ``splitmpi`` imports at run time (module, distribution), and what only some commands
# need: matplotlib draws the report's figures, PIL reads ImageNet's JPEGs (torchvision).
REQUIRED = [("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"),
            ("h5py", "h5py"), ("yaml", "PyYAML"), ("mpi4py", "mpi4py")]
OPTIONAL = [("matplotlib", "matplotlib"), ("PIL", "pillow")]
HEAVY = {"torch", "torchvision", "matplotlib", "PIL"}
WHEEL_HINT = ("carry them as wheels: see the download recipe at the top of "
              "tests/gpu/run.sh (pip download --only-binary=:all: ... NAME)")


def write_figures(path: str | None, text: str, figures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"text": text, "figures": figures}, indent=1,
                                         default=str) + "\n")
    print(f"figures: {text}", flush=True)


# -- link-site ---------------------------------------------------------------------------
def link_site(args) -> int:
    """Put this interpreter's site-packages on ``venv_python``'s path with a .pth file.

    ``python -m venv --system-site-packages`` links the *base* interpreter's packages. When
    the interpreter that holds torch is itself a venv (the GPU image's python3 is
    /opt/torch/.venv/bin/python3), its packages would be left out; appended by a .pth they
    come after the new venv's own, so the wheels installed there win. ``site.addsitedir``
    (a .pth line that starts with ``import`` runs) also reads the .pth files found there."""
    import site

    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    purelib = subprocess.run(
        [args.venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    pth = Path(purelib) / "_splitmpi_parent_site.pth"
    pth.write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    print(f"{pth}: {', '.join(dirs)}")
    return 0


# -- env ---------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _setup_cfg_ranges() -> dict[str, str]:
    """install_requires of setup.cfg: distribution name (lower case) -> requirement."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg.get("options", "install_requires", fallback="").split("\n")
    out = {}
    for line in filter(None, (x.strip() for x in lines)):
        name = line.split(";")[0]
        for sep in "<>=!~ [":
            name = name.split(sep)[0]
        out[name.lower()] = line
    return out


def _outside_range(dist: str, version: str, ranges: dict) -> str | None:
    """The setup.cfg requirement ``version`` misses, or None (also when unknown)."""
    req = ranges.get(dist.lower())
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        return None
    if not req or version == "?":
        return None
    try:
        ok = Requirement(req).specifier.contains(Version(version), prereleases=True)
    except Exception:
        return None
    return None if ok else req


def _card(mode: str) -> tuple[str, dict]:
    """A name for what the checks ran on, and the details."""
    info: dict = {}
    if mode == "gpu":
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"not run: {exc}"
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device_count=torch.cuda.device_count(),
                        name=torch.cuda.get_device_name(0),
                        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        memory_gib=round(props.total_memory / 2**30, 1),
                        multiprocessors=props.multi_processor_count,
                        torch_cuda=torch.version.cuda)
            return info["name"], info
        return "no CUDA device visible to torch", info
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info.update(cpu=model, cores=cores)
    return f"CPU only: {model}, {cores} cores", info


def _find(module: str, quick: bool) -> None:
    """Import ``module``; ``quick``: only find it, unless it is light (the CPU mode skips
    torch's seconds of import, which every later check pays anyway)."""
    if quick and module in HEAVY:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"No module named {module!r}")
        return
    importlib.import_module(module)


def env(args) -> int:
    """Every module splitmpi imports at run time imports here; the versions; the card.
    Missing required modules fail the check and are named, with how to bring them."""
    ranges = _setup_cfg_ranges()
    quick = args.mode == "cpu"
    found, missing, optional_missing, off_range = {}, [], [], []
    for module, dist in REQUIRED + OPTIONAL:
        try:
            _find(module, quick)
        except Exception as exc:  # ImportError, or a binary that does not load
            (missing if (module, dist) in REQUIRED else optional_missing).append(
                f"{dist} ({type(exc).__name__}: {exc})")
            continue
        found[dist] = _version(dist)
        req = _outside_range(dist, found[dist], ranges)
        if req:
            off_range.append(f"{dist} {found[dist]} (setup.cfg: {req})")
    figures: dict = {"python": f"{platform.python_version()} ({sys.executable})",
                     "versions": found, "missing": missing,
                     "optional_missing": optional_missing, "outside_setup_cfg": off_range}
    problems = list(missing)
    if "mpi4py" in found:
        try:
            from mpi4py import MPI

            figures["mpi_library"] = " ".join(MPI.Get_library_version().split("\n")[0].split())
            figures["mpi4py_path"] = str(Path(MPI.__file__).parent)
        except Exception as exc:  # mpi4py without an MPI library to load
            problems.append(f"MPI library ({type(exc).__name__}: {exc}; carry the mpich "
                            "wheel)")
    try:
        import splitmpi

        figures["splitmpi"] = f"{splitmpi.__version__} ({Path(splitmpi.__file__).parent})"
    except Exception as exc:
        problems.append(f"splitmpi ({type(exc).__name__}: {exc})")
    card, details = ("?", {})
    if "torch" in found or args.mode == "cpu":
        card, details = _card(args.mode)
    no_gpu = args.mode == "gpu" and "name" not in details
    figures.update(card=card, card_details=details)
    for line in (f"python {figures['python']}", f"card: {card} {details}",
                 f"MPI: {figures.get('mpi_library', '-')} (mpi4py in "
                 f"{figures.get('mpi4py_path', '-')})",
                 "versions: " + ", ".join(f"{k} {v}" for k, v in found.items())):
        print(line)
    if optional_missing:
        print("optional, missing (only some commands need them): "
              + "; ".join(optional_missing))
    if off_range:
        print("WARNING: outside setup.cfg's range: " + "; ".join(off_range))
    if problems:
        print("MISSING at run time: " + "; ".join(problems) + f"\n  {WHEEL_HINT}",
              file=sys.stderr)
    if no_gpu:
        print("no GPU: torch.cuda.is_available() is False in GPU mode (--cpu for the CPU)",
              file=sys.stderr)
    text = (f"{card}; torch {found.get('torch', '-')}, MPI "
            f"{figures.get('mpi_library', '-')}, mpi4py {found.get('mpi4py', '-')}; missing: "
            + (", ".join(p.split(" (")[0] for p in problems) or "none")
            + (f"; optional missing: {', '.join(p.split(' (')[0] for p in optional_missing)}"
               if optional_missing else ""))
    write_figures(args.figures, text, figures)
    return 1 if problems or no_gpu else 0


# -- staging -----------------------------------------------------------------------------
def staging(args) -> int:
    """The host staging of ``Transport`` (comm.gpu_aware=false): a send of batch i+1 started
    before batch i's is waited for must still deliver batch i's values.

    Rank 0 first runs ``tests/test_transport.py``'s in-process check over a loopback world;
    with 2 ranks, rank 0 then sends evaluate-like pipelined batches (128 KiB and 4 MiB) to
    rank 1 in another process, and a bfloat16-wire activation goes there and a gradient
    back. On ``cuda`` the tensors live on the GPU and a plain ``Transport`` stages them
    through pinned host buffers; on ``cpu`` staging is forced (``Staging``)."""
    import torch
    from mpi4py import MPI

    from splitmpi import loopback
    from splitmpi.transport import PACK_BYTES, Kind, Transport

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("staging --device cuda: no CUDA device", file=sys.stderr)
        return 1

    class Staging(Transport):
        """Stages every tensor, as a GPU rank without GPU-aware MPI stages CUDA tensors."""

        def _stages(self, t: torch.Tensor) -> bool:
            return True

    # the transport a rank uses here: the real one on a GPU, the forcing one on the CPU
    sending = Transport if device.type == "cuda" else Staging
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    figures: dict = {"device": str(device), "ranks": size}
    pinned = torch.cuda.is_available()

    def pools_pinned(t: Transport) -> bool:
        buffers = [s.buffer for pool in getattr(t, "_outgoing", {}).values() for s in pool]
        buffers += list(getattr(t, "_pinned", {}).values())
        return all(b.is_pinned() for b in buffers) and bool(buffers)

    if rank == 0:  # the in-process test, on this device
        shape = (128, 256)  # 128 KiB of float32
        batches = [torch.full(shape, float(i), device=device) for i in range(6)]
        with loopback.World(2) as lw:
            sender, receiver = sending(lw.comm(0)), Transport(lw.comm(1))
            assert sender._stages(batches[0]), "the sender does not stage"
            first = sender.isend(batches[0], 1, Kind.EVAL_ACTIVATION)
            second = sender.isend(batches[1], 1, Kind.EVAL_ACTIVATION)
            got = [receiver.recv(0, Kind.EVAL_ACTIVATION, device) for _ in range(2)]
            sender.wait(first)
            sender.wait(second)
            assert [g.unique().tolist() for g in got] == [[0.0], [1.0]], \
                [g.unique().tolist() for g in got]
            assert all(g.device.type == device.type for g in got)
            waiting = sender.isend(batches[0], 1, Kind.EVAL_ACTIVATION)
            for i in range(1, len(batches)):
                sends = sender.isend(batches[i], 1, Kind.EVAL_ACTIVATION)
                got_i = receiver.recv(0, Kind.EVAL_ACTIVATION, device)
                assert torch.equal(got_i, batches[i - 1]), (i, got_i.unique().tolist())
                sender.wait(waiting)
                waiting = sends
            assert torch.equal(receiver.recv(0, Kind.EVAL_ACTIVATION, device), batches[-1])
            sender.wait(waiting)
            pools = [len(pool) for pool in sender._outgoing.values()]
            assert pools == [2], pools
            if pinned:
                assert pools_pinned(sender), "a staging buffer is not pinned"
        figures["loopback"] = {"batches": len(batches), "staging_buffers": pools[0]}
        print(f"loopback: {len(batches)} pipelined batches kept their values, "
              f"{pools[0]} staging buffers", flush=True)

    if size >= 2 and rank < 2:  # two processes
        t = sending(world, wait="sleep" if device.type == "cpu" else "spin")
        shapes = [(128, 256), (1024, 1024)]  # 128 KiB and 4 MiB of float32
        per_shape = 4
        start = time.perf_counter()
        if rank == 0:
            for shape in shapes:
                batches = [torch.full(shape, float(i), device=device) for i in range(per_shape)]
                waiting = t.isend(batches[0], 1, Kind.EVAL_ACTIVATION)
                for b in batches[1:]:
                    sends = t.isend(b, 1, Kind.EVAL_ACTIVATION)
                    t.wait(waiting)
                    waiting = sends
                t.wait(waiting)
        else:
            for shape in shapes:
                for i in range(per_shape):
                    got = t.recv(0, Kind.EVAL_ACTIVATION, device)
                    assert got.device.type == device.type and tuple(got.shape) == shape
                    assert torch.equal(got, torch.full(shape, float(i), device=device)), \
                        (shape, i, got.unique().tolist()[:4])
        # an activation on a bfloat16 wire, and a gradient back, staged both ways
        wire = sending(world, wire_dtype="bfloat16")
        g = torch.Generator().manual_seed(7)
        x = torch.randn((32, 64, 8, 8), generator=g)
        if rank == 0:
            wire.send(x.to(device), 1, Kind.ACTIVATION)
            back = wire.recv(1, Kind.ACTIVATION_GRAD, device)
            assert back.dtype == torch.float32 and back.device.type == device.type
            assert torch.equal(back.cpu(), (2 * x).to(torch.bfloat16).float()), "gradient"
        else:
            a = wire.recv(0, Kind.ACTIVATION, device)
            assert a.dtype == torch.float32 and a.device.type == device.type
            assert torch.equal(a.cpu(), x.to(torch.bfloat16).float()), "activation"
            wire.send(2 * a, 0, Kind.ACTIVATION_GRAD)
        payload = x.numel() * 2
        assert wire.counters()["bytes_sent"] - payload < payload, wire.counters()
        # tensors of at most PACK_BYTES travel behind their header, through pinned memory
        small = [torch.full((n,), float(i), device=device)
                 for i, n in enumerate((1, 256, PACK_BYTES // 4, 256))]
        if rank == 0:
            for s in small:
                t.send(s, 1, Kind.FEATURES)
        else:
            for s in small:
                got = t.recv(0, Kind.FEATURES, device)
                assert got.device.type == device.type and torch.equal(got, s), \
                    (tuple(s.shape), got.unique().tolist()[:4])
        seconds = time.perf_counter() - start
        if pinned and device.type == "cuda":
            assert pools_pinned(t) and pools_pinned(wire), "a staging buffer is not pinned"
        if rank == 0:
            figures["two_ranks"] = {"batches": per_shape * len(shapes), "seconds": seconds,
                                    "bfloat16_wire": "ok", "pinned": pinned}
            print(f"2 ranks: {per_shape * len(shapes)} pipelined batches (128 KiB, 4 MiB) "
                  "kept their values; bfloat16 activation and gradient crossed; "
                  f"{len(small)} packed tensors (4 B to 64 KiB) crossed", flush=True)
    if rank == 0:
        two = ("; 2 ranks: 8 batches (128 KiB, 4 MiB) + bf16 wire + 4 packed ok"
               if size >= 2 else "")
        write_figures(args.figures, f"{device}: loopback 6 batches, "
                      f"{figures['loopback']['staging_buffers']} staging buffers{two}"
                      + (", pinned" if pinned else ""), figures)
    return 0


# -- results -----------------------------------------------------------------------------
def results(args) -> int:
    """Read a run's HDF5 file back: finished, every epoch and client there, finite numbers,
    the config asked for; with ``--baseline``, its bytes on the wire against that run's."""
    import numpy as np

    from splitmpi import reader

    run = reader.read(args.path)
    cfg = run.config
    problems = []
    if not run.finished:
        problems.append("the run did not finish")
    if run.epochs != args.epochs:
        problems.append(f"{run.epochs} epochs, not {args.epochs}")
    if sorted(run.clients) != list(range(1, args.clients + 1)):
        problems.append(f"clients {sorted(run.clients)}, not 1..{args.clients}")
    for key, want in (("device", args.device), ("amp", args.amp)):
        if want and cfg["train"][key] != want:
            problems.append(f"train.{key}={cfg['train'][key]}, not {want}")
    if args.wire and cfg["comm"]["wire_dtype"] != args.wire:
        problems.append(f"comm.wire_dtype={cfg['comm']['wire_dtype']}, not {args.wire}")
    if args.arch and cfg["model"]["arch"] != args.arch:
        problems.append(f"model.arch={cfg['model']['arch']}, not {args.arch}")
    for k, series in run.clients.items():
        for name in ("train_loss", "test_loss", "train_accuracy", "test_accuracy",
                     "samples_per_s"):
            values = np.asarray(series[name], dtype=float)
            if values.shape != (args.epochs,) or not np.isfinite(values).all():
                problems.append(f"client {k} {name} = {values.tolist()}")
        acc = np.asarray(series["test_accuracy"], dtype=float)
        if ((acc < 0) | (acc > 1)).any():
            problems.append(f"client {k} test_accuracy {acc.tolist()} outside [0, 1]")
    sent = np.asarray(run.comm.get("bytes_sent", np.zeros((0, 0))))
    got = np.asarray(run.comm.get("bytes_received", np.zeros((0, 0))))
    if sent.size == 0 or not (sent > 0).all():
        problems.append(f"bytes sent {sent.tolist()}")
    elif sent[:, 0].sum() != got[:, 1:].sum() or got[:, 0].sum() != sent[:, 1:].sum():
        problems.append("bytes sent by the server and received by the clients differ")
    final = run.final("test_accuracy")
    figures = {"clients": len(run.clients), "epochs": run.epochs,
               "arch": cfg["model"]["arch"], "cut": cfg["model"]["cut"],
               "image_size": cfg["data"]["image_size"], "device": cfg["train"]["device"],
               "amp": cfg["train"]["amp"], "wire_dtype": cfg["comm"]["wire_dtype"],
               "final_test_accuracy": final,
               "final_train_loss": {k: float(s["train_loss"][-1]) for k, s in
                                    run.clients.items() if len(s["train_loss"])},
               "samples_per_s": {k: float(s["samples_per_s"][-1]) for k, s in
                                 run.clients.items() if len(s["samples_per_s"])},
               "epoch_seconds": [float(s) for s in run.epoch_seconds],
               "bytes_sent": int(sent.sum()) if sent.size else 0,
               "mpi_library": run.attrs.get("mpi_library")}
    ratio = None
    base = reader.read(args.baseline) if args.baseline and Path(args.baseline).is_file() \
        else None
    if args.baseline:
        if base is not None and base.finished and base.epochs == run.epochs:
            base_sent = int(np.asarray(base.comm["bytes_sent"]).sum())
            ratio = figures["bytes_sent"] / base_sent if base_sent else float("nan")
            figures["bytes_vs_baseline"] = ratio
            figures["baseline"] = str(args.baseline)
            if not ratio <= args.max_ratio:
                problems.append(f"bytes on the wire {ratio:.3f} of the baseline's, not at "
                                f"most {args.max_ratio}")
        else:
            figures["bytes_vs_baseline"] = None
            print(f"no finished baseline {args.baseline} (its run failed?): bytes not "
                  "compared")
    print(reader.summary(run))
    speed = sum(figures["samples_per_s"].values())
    n = len(run.clients)
    text = (f"{n} client{'s' if n != 1 else ''} x {run.epochs} epochs, {cfg['model']['arch']} "
            f"cut {cfg['model']['cut']} at {cfg['data']['image_size']} px on "
            f"{cfg['train']['device']}; final test accuracy "
            + "/".join(f"{a:.2f}" for a in final.values())
            + f"; train samples/s (all clients) {speed:.0f}; epoch seconds "
            + "/".join(f"{s:.2f}" for s in figures["epoch_seconds"])
            + f"; {figures['bytes_sent'] / 1e6:.2f} MB sent"
            + (f"; bytes vs float32-wire run {ratio:.3f}" if ratio is not None else ""))
    write_figures(args.figures, text, figures)
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


# -- bench -------------------------------------------------------------------------------
def bench(args) -> int:
    """A benchmark's JSON: its ratio, rows with positive figures, the device asked for."""
    doc = json.loads(Path(args.path).read_text())
    problems = []
    ratio = doc.get("ratio")
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        problems.append(f"ratio {ratio!r}")
    rows = doc.get("rows") or []
    if not rows:
        problems.append("no rows")
    figures: dict = {"ratio_line": doc.get("ratio_line"), "ratio": ratio,
                     "world_size": doc.get("world_size"), "cuda": doc.get("cuda"),
                     "mpi_library": doc.get("mpi_library"), "smoke": doc.get("smoke")}
    if args.name == "transport":
        device = doc.get("settings", {}).get("device", "")
        if not device.startswith(args.device):
            problems.append(f"ran on {device}, not {args.device}")
        figures["rows"] = [{k: r.get(k) for k in ("bytes", "raw_gbps", "splitmpi_gbps",
                                                  "ratio", "raw_us", "splitmpi_us",
                                                  "pickle_gbps")} for r in rows]
        for r in rows:
            if not (r.get("raw_gbps", 0) > 0 and r.get("splitmpi_gbps", 0) > 0):
                problems.append(f"row {r.get('bytes')}: {r}")
        big = max(rows, key=lambda r: r["bytes"]) if rows else {}
        text = (f"{doc.get('ratio_line')}; at {big.get('bytes', 0) / 2**20:g} MiB raw "
                f"{big.get('raw_gbps', 0):.2f} GB/s, splitmpi {big.get('splitmpi_gbps', 0):.2f}"
                f" GB/s ({device})")
    else:
        models = doc.get("settings", {}).get("models", {})
        devices = {m.get("device", "") for m in models.values()}
        if not devices or not all(d.startswith(args.device) for d in devices):
            problems.append(f"ran on {sorted(devices)}, not {args.device}")
        figures["rows"] = [{k: r.get(k) for k in ("arch", "cut", "clients", "variant",
                                                  "samples_per_s", "vs_monolithic")}
                           for r in rows]
        figures["ratio_by_schedule"] = doc.get("ratio_by_schedule")
        for r in rows:
            if not r.get("samples_per_s", 0) > 0:
                problems.append(f"row {r.get('arch')} {r.get('variant')}: {r}")
        speeds = ", ".join(f"{r['arch']} {r['variant']} {r['samples_per_s']:.0f}"
                           for r in rows if r["variant"] in ("monolithic", "round_robin"))
        text = f"{doc.get('ratio_line')}; samples/s: {speeds} ({', '.join(sorted(devices))})"
    write_figures(args.figures, text, figures)
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


# -- summary -----------------------------------------------------------------------------
def _table(columns: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return "-" if v != v else f"{v:.3g}"
        return "-" if v is None else str(v).replace("|", "/")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def summary(args) -> int:
    """summary.md and summary.json in ``--out`` from ``WORK/checks.tsv`` (name, status,
    seconds, note per line) and the checks' ``WORK/fig-NAME.json``."""
    work, out = Path(args.work), Path(args.out)
    checks = []
    tsv = work / "checks.tsv"
    for line in (tsv.read_text().splitlines() if tsv.is_file() else []):
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        fig_path = work / f"fig-{name}.json"
        fig = json.loads(fig_path.read_text()) if fig_path.is_file() else {}
        checks.append({"name": name, "status": status, "seconds": float(seconds or 0),
                       "note": note, "text": fig.get("text", ""),
                       "figures": fig.get("figures", {})})
    deps = next((c["figures"] for c in checks if c["name"] == "deps"), {})
    ok = bool(checks) and all(c["status"] in ("PASS", "SKIP") for c in checks)
    done = not args.partial
    verdict = ("PASS" if ok else "FAIL") if done else ("RUNNING" if ok else "FAIL (running)")
    card = deps.get("card") or args.card or "?"
    versions = deps.get("versions", {})
    doc = {"ok": ok and done, "verdict": verdict, "mode": args.mode, "card": card,
           "card_details": deps.get("card_details", {}),
           "mpi_library": deps.get("mpi_library"), "python": deps.get("python"),
           "splitmpi": deps.get("splitmpi"), "versions": versions,
           "commit": args.commit, "started": args.started,
           "seconds": sum(c["seconds"] for c in checks), "checks": checks}
    md = [f"# splitmpi GPU acceptance ({args.mode} mode): {verdict}", "",
          f"- card: **{card}**"]
    details = deps.get("card_details", {})
    if details.get("nvidia_smi"):
        md.append(f"- nvidia-smi: {details['nvidia_smi']}")
    if details.get("torch_cuda"):
        md.append(f"- torch {versions.get('torch', '?')}, CUDA {details['torch_cuda']}, "
                  f"capability {details.get('capability')}, "
                  f"{details.get('memory_gib')} GiB, {details.get('device_count')} device(s)")
    md += [f"- MPI: {deps.get('mpi_library', '?')}; mpi4py {versions.get('mpi4py', '?')}; "
           f"python {deps.get('python', '?')}",
           f"- splitmpi {deps.get('splitmpi', '?')}, commit {args.commit or '?'}",
           f"- started {args.started or '?'}, checks took {doc['seconds']:.0f} s", "",
           *_table(["check", "result", "seconds", "figures"],
                   [[c["name"], c["status"], f"{c['seconds']:.1f}",
                     "; ".join(filter(None, [c["note"], c["text"]]))] for c in checks])]
    for c in checks:
        rows = c["figures"].get("rows")
        if c["name"] == "bench_transport" and rows:
            md += ["", f"## bench transport ({c['figures'].get('world_size')} ranks)", "",
                   *_table(["size", "raw GB/s", "splitmpi GB/s", "ratio", "raw us",
                            "splitmpi us", "pickle GB/s"],
                           [[f"{r['bytes'] / 1024:g} KiB", r["raw_gbps"], r["splitmpi_gbps"],
                             r["ratio"], r["raw_us"], r["splitmpi_us"], r["pickle_gbps"]]
                            for r in rows]),
                   "", f"`{c['figures'].get('ratio_line')}`"]
        if c["name"] == "bench_train" and rows:
            md += ["", f"## bench train ({c['figures'].get('world_size')} ranks)", "",
                   *_table(["model", "cut", "clients", "variant", "samples/s",
                            "vs monolithic"],
                           [[r["arch"], r["cut"], r["clients"], r["variant"],
                             r["samples_per_s"], r["vs_monolithic"]] for r in rows]),
                   "", f"`{c['figures'].get('ratio_line')}`"]
    failed = [c for c in checks if c["status"] not in ("PASS", "SKIP")]
    for c in failed:
        md += ["", f"## {c['name']}: {c['status']} (last lines of its log)", "", "```",
               _tail(work / f"log-{c['name']}.txt"), "```"]
    missing = deps.get("missing", []) + deps.get("optional_missing", [])
    if missing:
        md += ["", "Missing modules: " + "; ".join(missing) + f" ({WHEEL_HINT})"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="checks.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("link-site")
    s.add_argument("venv_python")
    s = sub.add_parser("env")
    s.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    s = sub.add_parser("staging")
    s.add_argument("--device", choices=("cuda", "cpu"), required=True)
    s = sub.add_parser("results")
    s.add_argument("path")
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("--device", default="")
    s.add_argument("--amp", default="")
    s.add_argument("--wire", default="")
    s.add_argument("--arch", default="")
    s.add_argument("--baseline", default="", help="a run to compare the bytes sent with")
    s.add_argument("--max-ratio", type=float, default=0.65)
    s = sub.add_parser("bench")
    s.add_argument("name", choices=("transport", "train"))
    s.add_argument("path")
    s.add_argument("--device", choices=("cuda", "cpu"), required=True)
    s = sub.add_parser("summary")
    s.add_argument("--work", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--mode", required=True)
    s.add_argument("--partial", action="store_true", help="checks are still running")
    s.add_argument("--card", default="")
    s.add_argument("--commit", default="")
    s.add_argument("--started", default="")
    for s in sub.choices.values():
        if "--figures" not in s._option_string_actions:
            s.add_argument("--figures", default="", help="write the figures here (JSON)")
    args = p.parse_args(argv)
    command = {"link-site": link_site, "env": env, "staging": staging, "results": results,
               "bench": bench, "summary": summary}[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
