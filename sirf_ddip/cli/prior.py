"""CLI of the diffusion prior: ``sirf-ddip pretrain`` and ``sirf-ddip prior check|info``."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain the MR-guided diffusion prior",
                              description="Train the ε-prediction U-Net prior from a YAML config (see "
                                          "configs/pretrain-default.yaml). Multi-GPU: torchrun --nproc_per_node N "
                                          "-m sirf_ddip pretrain CONFIG --out DIR.")
    p.add_argument("config", help="pretraining YAML config")
    p.add_argument("--out", required=True, help="output folder (checkpoint, log, prior.safetensors + card)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from DIR/checkpoint.pt")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="allow an --out folder that already holds results")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. train.steps=100); repeatable")
    p.set_defaults(func=_pretrain)

    pr = subparsers.add_parser("prior", help="inspect or test a prior (check, info)")
    sub = pr.add_subparsers(dest="prior_command", metavar="ACTION")
    c = sub.add_parser("check", help="noise an image to step t and denoise it with one Tweedie step",
                       description="Scale IMG to network units, add diffusion noise of step T, denoise every "
                                   "overlapping 3-plane slab with one Tweedie step, write both in IMG's units "
                                   "and grid, and print their PSNR against IMG inside a head mask (smoothed IMG "
                                   "> 10%% of its maximum) or --mask.")
    c.add_argument("--image", required=True, help="PET image (.hv, .nii, .nii.gz)")
    c.add_argument("--mr", default=None, help="co-registered MR on the same grid (needed by MR-guided priors)")
    c.add_argument("--t", type=int, default=200, help="diffusion step (0..T-1; default 200)")
    c.add_argument("--seed", type=int, default=0, help="noise seed")
    c.add_argument("--mr-guidance", type=float, default=1.0,
                   help="classifier-free MR guidance w (1: MR-conditioned; 0: the prior's learned no-MR input; "
                        "w != 1 needs a prior trained with MR dropout)")
    c.add_argument("--out", required=True, help="denoised image output")
    c.add_argument("--noisy-out", default=None, help="also write the noisy image")
    c.add_argument("--mask", default=None, help="mask image (non-zero = inside) for the PSNR")
    c.add_argument("--weights", default=None, help="prior weights (.safetensors or folder; default: shipped)")
    c.add_argument("--device", default="auto")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_check)
    i = sub.add_parser("info", help="print a prior's card")
    i.add_argument("--weights", default=None, help="prior weights (.safetensors or folder; default: shipped)")
    i.add_argument("--json", action="store_true", help="print the whole card as JSON")
    i.set_defaults(func=_info)
    pr.set_defaults(func=lambda a: (pr.print_help(), 2)[1])


def _pretrain(args) -> int:
    from ..prior.train import load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    res = pretrain(cfg, args.out, resume=args.resume, device=args.device, overwrite=args.overwrite,
                   config_path=args.config)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports
        return 0
    print(f"pretrain: {res['steps']} steps in {res['seconds']:.1f} s; loss first-20 mean "
          f"{res['mean_loss_first']:.4f}, last-20 mean {res['mean_loss_last']:.4f}")
    if "card" in res:
        print(f"prior written: {res['card']}")
    return 0


def _check(args) -> int:
    from ..prior.check import run_check

    res = run_check(args.image, args.mr, args.t, args.seed, args.out, noisy_out=args.noisy_out,
                    weights=args.weights, device=args.device, overwrite=args.overwrite, mask_path=args.mask,
                    mr_guidance=args.mr_guidance)
    print(res.summary())
    return 0


def _info(args) -> int:
    from ..prior.weights import verified_card

    path, card, sha = verified_card(args.weights)  # unknown or mismatched weights are refused, never described
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    tr = card.get("training", {})
    arch = card.get("architecture", {})
    lines = [
        f"prior: {path}",
        f"  format: {card.get('format')}  created: {card.get('created')}",
        f"  architecture: {json.dumps(arch)}",
        f"  parameters: {card.get('num_parameters')}  stored as {card.get('weights_dtype')}",
        f"  schedule: {json.dumps(card.get('schedule'))}",
        f"  PET scaling: {json.dumps(card.get('pet_scaling'))}",
        f"  MR scaling: {json.dumps(card.get('mr_scaling'))}",
        f"  training: {tr.get('steps')} steps, batch {tr.get('batch_size')}, {tr.get('seconds')} s on "
        f"{tr.get('device')}",
        f"  data: {json.dumps(tr.get('data'))}",
        f"  sha256: {sha} (matches the card)",
    ]
    print("\n".join(lines))
    return 0
