"""``lowra fleet train | status | retry | retire``: personalize many users on Ray, with the registry as the job's state.

Only ``train`` imports torch and Ray (inside :mod:`lowra.sdk.fleet.runner`, when it runs); ``status``, ``retry`` and
``retire`` touch the database alone, so they answer in a fraction of a second on any machine that can reach it.
"""
from __future__ import annotations

import argparse
import json

from lowra.sdk.errors import ConfigError


def cmd_fleet(args: argparse.Namespace) -> int:
    return _ACTIONS[args.fleet_command](args)


def _train(args: argparse.Namespace) -> int:
    from lowra.sdk.cli.configs import compress_config, lora_config
    from lowra.sdk.fleet.gate import GateConfig
    from lowra.sdk.fleet.runner import CliBase, FleetSettings, run_fleet
    from lowra.sdk.training.config import TrainConfig

    if (args.sign_key is None) != (args.user_id_from is None):
        raise ConfigError("--sign-key and --user-id-from dataset go together: a signed blob names the user it is "
                          "for, taken from each user's dataset")
    settings = FleetSettings(
        registry=args.registry, out=args.out, base=CliBase(args.base, args.quantized_base), lora=lora_config(args),
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, max_len=args.max_len,
                          seed=args.seed),
        compress=compress_config(args),
        gate=GateConfig(min_gain_over_base=args.min_gain_over_base, min_gain_kept=args.min_gain_kept),
        batch_users=args.batch_users, lease_seconds=args.lease_seconds, sign_key=args.sign_key,
    )
    run = run_fleet(args.users, settings, address=args.address, workers=args.workers, threads=args.threads)
    print(f"{len(run.users)} users; this run finished {run.finished_this_run} in {run.seconds:.0f} s "
          f"({run.users_per_hour:,.0f} users/hour) on {run.plan.workers} worker(s) x {run.plan.threads} thread(s)")
    for user, reason in sorted(run.input_failures.items()):
        print(f"  failed at input: {user}: {reason}")
    print(f"report: {args.out}/report.md")
    return 0


def _status(args: argparse.Namespace) -> int:
    from lowra.sdk.fleet.registry import Registry

    with Registry(args.registry) as registry:
        status = registry.status()
        problems = registry.newest(("failed", "gated_out"))
    if args.json:
        print(json.dumps({"users": status.users, "latest": status.latest, "serving": status.serving,
                          "problems": [{"user": v.user_id, "version": v.version, "status": v.status,
                                        "reason": v.reason} for v in problems]}, indent=2))
        return 0
    counts = ", ".join(f"{state} {n}" for state, n in status.latest.items())
    print(f"{status.users} users; newest versions: {counts}; {status.serving} serving an active adapter")
    for version in problems:
        print(f"  {version.status}: {version.user_id} v{version.version}: {version.reason}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from lowra.sdk.fleet.registry import Registry

    with Registry(args.registry) as registry:
        users = args.users or [v.user_id for v in registry.newest(("failed",))]
        for user in users:
            print(f"{user}: version {registry.retry(user)} queued")
    print(f"{len(users)} users queued; run `lowra fleet train` to train them")
    return 0


def _retire(args: argparse.Namespace) -> int:
    from lowra.sdk.fleet.registry import Registry

    with Registry(args.registry) as registry:
        queued = registry.retire_base(args.base)
    for user in queued:
        print(f"{user}: queued for retraining")
    print(f"base {args.base} retired; {len(queued)} users queued; run `lowra fleet train` with the new base")
    return 0


_ACTIONS = {"train": _train, "status": _status, "retry": _retry, "retire": _retire}
