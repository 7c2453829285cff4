"""``python -m splitmpi.attack [-c CONFIG] [key=value ...]``: one process, no mpiexec.

The settings are checked before any work (exit 2 with one message naming the fix, and
nothing written), and a run's checkpoint is located and its config taken
(``target.for_run``); then the target, and either model completion or the images and each
inversion method in turn, every method's results written as soon as it ends.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from .. import data, logs
from ..config import Config
from ..errors import ConfigError
from ..runtime import node_cores, pick_device, pick_threads
from .completion import completion_attack
from .decoder import decoder_attack
from .images import attack_images
from .output import check_output, now, output_path, write, write_completion
from .rmle import rmle_attack
from .target import Target, describe_defense, feature_rms, for_run, get_target, observe

log = logging.getLogger(__name__)

METHODS = ("decoder", "rmle")


def validate(cfg: Config) -> Config:
    """What ``config.load`` cannot check because it needs files: the checkpoint to attack
    exists (a run's: ``target.for_run``, whose config is returned), the method fits it and
    the output can be written. ConfigError on a bad one."""
    cfg = for_run(cfg)
    if cfg.attack.method == "completion":
        if not (cfg.attack.checkpoint and Path(cfg.attack.checkpoint).is_dir()):
            raise ConfigError("attack.method=completion needs the server's cloud, which a "
                              "run's checkpoint holds",
                              "pass attack.checkpoint=OUTPUT.h5 (or OUTPUT.h5.ckpt) of a run "
                              "saved with train.checkpoint_every=1")
        if cfg.split.topology != "u_shape":
            raise ConfigError(f"attack.method=completion infers labels the clients keep, but "
                              f"the run's split.topology={cfg.split.topology} sends them to "
                              "the server", "attack a u_shape run")
    check_output(cfg)
    return cfg


def completion(cfg: Config, target: Target, started: str, t0: float) -> Path:
    """Model completion on ``target``, written to ``/attack/completion``."""
    t1 = time.perf_counter()
    result = completion_attack(cfg, target)
    write_completion(cfg, target, result, {"started": started,
                                           "seconds": time.perf_counter() - t1,
                                           "total_seconds": time.perf_counter() - t0})
    path = output_path(cfg)
    print(f"completion: accuracy {result['accuracy']:.4f} on client {target.client}'s "
          f"{result['test_samples']} test images from {result['known_samples']} known labels "
          f"({cfg.attack.known_labels} per class); the client's own {target.accuracy:.4f}, "
          f"chance {result['chance']:.4f} -> {path}:/attack/completion", flush=True)
    return path


def run(cfg: Config) -> Path:
    torch.set_num_threads(pick_threads(cfg.train.threads, 1, node_cores()))
    device = pick_device(cfg.train.device, 0)
    data.check_available(cfg.data)
    started = now()
    t0 = time.perf_counter()
    target = get_target(cfg, device)
    log.info(f"target: {cfg.model.arch} cut {cfg.model.cut}, defense {describe_defense(cfg)}, "
             f"{target.source}, utility (client {target.client} test accuracy) "
             f"{target.accuracy:.4f}")
    if cfg.attack.method == "completion":
        return completion(cfg, target, started, t0)
    aux, evaluated, aux_source, eval_source = attack_images(cfg)
    methods = METHODS if cfg.attack.method == "both" else (cfg.attack.method,)
    path = output_path(cfg)
    for method in methods:
        t1 = time.perf_counter()
        log.info(f"{method} attack: {eval_source}; aux: {aux_source}")
        if method == "decoder":
            result = decoder_attack(cfg, target, aux, evaluated, device)
        else:
            result = rmle_attack(cfg, target, evaluated)
        info = {"started": started, "seconds": time.perf_counter() - t1,
                "total_seconds": time.perf_counter() - t0, "eval_source": eval_source,
                "aux_source": aux_source if method == "decoder" else "none (white-box)",
                "aux_samples": len(aux) if method == "decoder" else 0,
                "feature_shape": np.asarray(observe(target, evaluated[:1]).shape[1:]),
                "feature_rms": feature_rms(target, evaluated)}
        g = write(cfg, method, target, evaluated, result, info)
        print(f"{method}: PSNR {g['psnr_mean']:.2f} +- {g['psnr_std']:.2f} dB, SSIM "
              f"{g['ssim_mean']:.3f} +- {g['ssim_std']:.3f}, score {g['score_mean']:.3f}, "
              f"MSE {g['mse_mean']:.5f} ([0,1] pixels); utility {target.accuracy:.4f} "
              f"-> {path}:/attack/{method}", flush=True)
    return path


def parser() -> argparse.ArgumentParser:
    keys = [f"  attack.{f.name}={getattr(config_mod.AttackConfig(), f.name)!r}"
            for f in dataclasses.fields(config_mod.AttackConfig)]
    p = argparse.ArgumentParser(
        prog="python -m splitmpi.attack",
        description="Feature-inversion attack (decoder or white-box rMLE) on a trained "
                    "extractor, or model completion of a run's cloud; results go to "
                    "/attack/<method> of a splitmpi results file. One process, no mpiexec.",
        epilog="attack keys and defaults (any config key can be overridden):\n"
               + "\n".join(keys), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.cut=1 attack.method=rmle")
    logs.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(verbosity=args.verbosity)
    try:
        cfg = validate(config_mod.load(args.config, args.overrides))
        run(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"splitmpi.attack: error: {exc}\n")
        return ConfigError.exit_code
    return 0
